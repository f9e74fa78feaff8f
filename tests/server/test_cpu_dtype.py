"""The CPU engine's dtype by capability (server/cpu_dtype.py): bfloat16 only with native bfloat16 flags, an
explicit setting always wins, /proc/cpuinfo read and parsed, the KV-cache arithmetic behind the 4 GiB
default, and the compose stack's entry point (server/cpu_engine.py) that applies the same rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server.cpu_dtype import (
    choose_cpu_dtype,
    kv_bytes_per_token,
    kvcache_gib_needed,
    parse_cpu_flags,
    read_cpu_flags,
    resolve_dtype,
)
from server.cpu_cores import worker_binding
from server.cpu_engine import API_SERVER, split_dtype, vllm_command
from server.settings import GatewaySettings

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"})
ICE_LAKE = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni"}  # AVX-512 without its bfloat16 extension

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


@pytest.mark.parametrize(("flags", "dtype"), [
    (AVX2_ONLY, "float32"),
    (ICE_LAKE, "float32"),
    (ICE_LAKE | {"avx512_bf16"}, "bfloat16"),       # Cooper Lake, Zen 4
    (AVX2_ONLY | {"amx_bf16", "amx_tile"}, "bfloat16"),
    (ICE_LAKE | {"avx512_bf16", "amx_bf16"}, "bfloat16"),  # Sapphire Rapids
    (frozenset(), "float32"),                       # no /proc/cpuinfo (another OS)
])
def test_bfloat16_only_with_native_instructions(flags: frozenset[str], dtype: str) -> None:
    assert choose_cpu_dtype(flags)[0] == dtype


def test_the_reason_names_the_flags() -> None:
    assert choose_cpu_dtype(AVX2_ONLY)[1] == "this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag)"
    assert choose_cpu_dtype(CPUINFO.split())[1] == "this CPU has native bfloat16 (avx512_bf16, amx_bf16)"


def test_auto_resolves_by_the_flags_and_says_how_to_override() -> None:
    line = ("dtype float32: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag); "
            "set --engine-dtype to override")
    assert resolve_dtype("auto", AVX2_ONLY, override="--engine-dtype") == ("float32", line)
    dtype, line = resolve_dtype("auto", {"amx_bf16"}, override="X")
    assert dtype == "bfloat16" and line == "dtype bfloat16: this CPU has native bfloat16 (amx_bf16); set X to override"


@pytest.mark.parametrize("explicit", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("flags", [AVX2_ONLY, ICE_LAKE | {"avx512_bf16", "amx_bf16"}])
def test_an_explicit_dtype_always_wins(explicit: str, flags: frozenset[str]) -> None:
    assert resolve_dtype(explicit, flags, override="--engine-dtype") == (
        explicit, f"dtype {explicit}: set explicitly (--engine-dtype)")


def test_the_setting_defaults_to_auto_and_rejects_unknown_dtypes() -> None:
    assert GatewaySettings().engine_dtype == "auto"
    with pytest.raises(ValueError, match="engine_dtype"):
        GatewaySettings(engine_dtype="bf16")


def test_flags_from_proc_cpuinfo_text(tmp_path: Path) -> None:
    flags = parse_cpu_flags(CPUINFO)
    assert {"avx2", "avx512_bf16", "amx_bf16"} <= flags and "spectre_v1" not in flags
    assert parse_cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == frozenset()  # no x86 flags line
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert read_cpu_flags(path) == flags
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_kv_bytes_per_token_of_the_default_model() -> None:
    # 2 (K, V) x 30 layers x 3 KV heads x head_dim 64 = 11,520 elements per token
    assert kv_bytes_per_token("bfloat16") == 23_040 and kv_bytes_per_token("float32") == 46_080
    assert kv_bytes_per_token("float32", layers=1, kv_heads=1, head_dim=1) == 8


def test_the_default_kv_cache_holds_a_full_request_in_float32() -> None:
    """float32 doubles the bytes per token: 65,536 tokens take 2.81 GiB (1.41 in bfloat16); the 4 GiB default
    holds that with a 25 % margin, so it need not follow the dtype."""
    settings = GatewaySettings()
    tokens = settings.rope_scaling().max_context
    assert tokens == 65_536
    assert tokens * kv_bytes_per_token("float32") / 2**30 == 2.8125
    assert (kvcache_gib_needed(tokens, "bfloat16"), kvcache_gib_needed(tokens, "float32")) == (2, 4)
    assert settings.engine_kvcache_gib >= kvcache_gib_needed(tokens, "float32")


@pytest.mark.parametrize(("args", "requested", "rest"), [
    (["--model=m", "--dtype=auto", "--port=8001"], "auto", ["--model=m", "--port=8001"]),
    (["--dtype", "float16", "--model", "m"], "float16", ["--model", "m"]),
    (["--model", "m"], "auto", ["--model", "m"]),
    (["--dtype=float32", "--dtype", "bfloat16"], "bfloat16", []),  # the last one wins, as in argparse
])
def test_entry_point_finds_the_dtype(args: list[str], requested: str, rest: list[str]) -> None:
    assert split_dtype(args) == (requested, rest)


def test_entry_point_runs_vllm_with_the_chosen_dtype() -> None:
    args = ["--model=/m", "--dtype=auto", "--max-model-len=65536"]
    command, line = vllm_command(args, AVX2_ONLY)
    assert command == [sys.executable, "-m", API_SERVER, "--model=/m", "--max-model-len=65536", "--dtype", "float32"]
    assert line.startswith("dtype float32: this CPU has no native bfloat16") and "ROPESERVE_ENGINE_DTYPE" in line
    assert vllm_command(args, {"avx512_bf16"})[0][-2:] == ["--dtype", "bfloat16"]
    assert vllm_command(["--dtype=float32"], {"amx_bf16"})[0][-2:] == ["--dtype", "float32"]


def test_entry_point_logs_the_choices_and_becomes_vllm(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from server import cpu_engine

    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(cpu_engine, "read_cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(cpu_engine, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")  # docker-compose.yml's default: unset
    monkeypatch.setattr(cpu_engine.os, "execve", lambda path, argv, env: execs.append((path, argv, env)))
    with caplog.at_level("INFO", logger="ropeserve.cpu_engine"):
        cpu_engine.main(["--model=/m", "--dtype=auto"])
    ((path, argv, env),) = execs
    assert (path, argv) == (sys.executable, [sys.executable, "-m", API_SERVER, "--model=/m", "--dtype", "float32"])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"  # both cores of this 2-CPU machine
    assert caplog.messages == [vllm_command(["--dtype=auto"], AVX2_ONLY)[1], worker_binding({}, [0, 1])[1]]
