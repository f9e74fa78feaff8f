"""The embedded engine: the command built from the settings (never run here: no real vLLM in this suite),
its dtype chosen by the CPU's flags and logged, and the process supervision (start, readiness, restart with
backoff, stopping the whole process group), exercised with a stand-in engine process (tests/server/tiny_engine.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from server.cpu_dtype import kvcache_gib_needed
from server.engine_process import (
    EngineProcess,
    EngineStartError,
    embedded_engine,
    engine_command,
    engine_env,
    free_port,
    hf_overrides,
    read_rope_theta,
)
from server.settings import GatewaySettings
from tests.server.helpers import alive, group_members, wait_until

pytestmark = pytest.mark.anyio

TINY = str(Path(__file__).with_name("tiny_engine.py"))
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # no native bfloat16
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}

CONTRACT = [
    sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/smol", "--host",
    "127.0.0.1", "--port", "8123", "--served-model-name", "SmolLM2-135M-Instruct",
    "--dtype", "bfloat16", "--max-model-len", "65536", "--hf-overrides",
    '{"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 100000.0, "factor": 8.0, '
    '"original_max_position_embeddings": 8192}, "max_position_embeddings": 65536}',
]


def test_default_command_is_the_engine_contract() -> None:
    command = engine_command(GatewaySettings(), model_dir=Path("/models/smol"), port=8123, rope_theta=100000,
                             dtype="bfloat16")
    assert command == CONTRACT


def test_command_follows_the_settings() -> None:
    settings = GatewaySettings(rope_original_max_position=4096, rope_max_factor=4, rope_buckets="1,1.5,4",
                               rope_finetuned_factor=1.5, rope_generation_reserve=128, served_model_name="m",
                               engine_python="/opt/py", engine_enforce_eager=True,
                               rope_headroom=1.25, engine_extra_args="--max-num-seqs 2 --seed 7")
    command = engine_command(settings, model_dir=Path("/m"), port=9, rope_theta=500000.0, dtype="float32")
    assert command[0] == "/opt/py" and command[-4:] == ["--max-num-seqs", "2", "--seed", "7"]
    assert command[command.index("--max-model-len") + 1] == "16384"
    assert command[command.index("--dtype") + 1] == "float32" and "--enforce-eager" in command
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides == {"rope_parameters": {
        "rope_type": "dynamic_yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 4096,
        "buckets": [1.0, 1.5, 4.0], "generation_reserve": 128, "finetuned_factor": 1.5, "headroom": 1.25},
        "max_position_embeddings": 16384}


def test_overrides_read_back_as_the_same_scaling() -> None:
    from rope_ext import RopeScaling

    for growth in ("reserve", "rerotate"):
        settings = GatewaySettings(rope_buckets="1,3,8", rope_finetuned_factor=3, rope_generation_reserve=64,
                                   rope_growth=growth, rope_headroom=1.5)
        overrides = hf_overrides(settings.rope_scaling(), 1e5)
        assert RopeScaling.from_rope_parameters(overrides["rope_parameters"]) == settings.rope_scaling()
        assert overrides["rope_parameters"].get("growth", "reserve") == growth


def test_rope_theta_from_the_model_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 100000.0}}))
    assert read_rope_theta(tmp_path) == 100000.0
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 10000}))
    assert read_rope_theta(tmp_path) == 10000.0
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="rope_theta"):
        read_rope_theta(tmp_path)


async def test_embedded_engine_from_settings(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 100000.0}}))
    engine = await embedded_engine(GatewaySettings(model_dir=tmp_path, engine_port=8123, engine_kvcache_gib=3),
                                   cpu_flags=lambda: SAPPHIRE_RAPIDS)
    assert engine.url == "http://127.0.0.1:8123"
    assert engine.command == [*CONTRACT[:4], str(tmp_path), *CONTRACT[5:]]
    assert engine.env["VLLM_CPU_KVCACHE_SPACE"] == "3" and not engine.running


async def test_avx2_only_cpu_runs_float32_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 100000.0}))
    settings = GatewaySettings(model_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="server.engine_process"):
        engine = await embedded_engine(settings, cpu_flags=lambda: AVX2_ONLY)
    assert engine.command[engine.command.index("--dtype") + 1] == "float32"
    assert "dtype float32: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag); set --engine-dtype " \
        "to override" in caplog.messages
    # float32 doubles the KV cache per token; the default still holds one full request of the default model
    kvcache = float(engine.env["VLLM_CPU_KVCACHE_SPACE"])
    assert kvcache == settings.engine_kvcache_gib >= kvcache_gib_needed(settings.rope_scaling().max_context, "float32")


@pytest.mark.parametrize(("flags", "chosen"), [(AVX2_ONLY, "float32"), (SAPPHIRE_RAPIDS, "bfloat16")])
async def test_embedded_engine_dtype_follows_the_cpu(tmp_path: Path, flags: frozenset[str], chosen: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 100000.0}))
    engine = await embedded_engine(GatewaySettings(model_dir=tmp_path), cpu_flags=lambda: flags)
    assert engine.command[engine.command.index("--dtype") + 1] == chosen


@pytest.mark.parametrize("flags", [AVX2_ONLY, SAPPHIRE_RAPIDS])
@pytest.mark.parametrize("explicit", ["bfloat16", "float32"])
async def test_an_explicit_engine_dtype_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             flags: frozenset[str], explicit: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 100000.0}))
    settings = GatewaySettings(model_dir=tmp_path, engine_dtype=explicit)
    with caplog.at_level(logging.INFO, logger="server.engine_process"):
        engine = await embedded_engine(settings, cpu_flags=lambda: flags)
    assert engine.command[engine.command.index("--dtype") + 1] == explicit
    assert f"dtype {explicit}: set explicitly (--engine-dtype)" in caplog.messages


def test_engine_env() -> None:
    env = engine_env(GatewaySettings(engine_kvcache_gib=2.5), {"A": "1", "ROPESERVE_METRICS_DIR": "/tmp/other"})
    assert env == {"A": "1", "VLLM_CPU_KVCACHE_SPACE": "2.5"}  # an inherited counter directory is not shared


def tiny(port: int, *args: str) -> list[str]:
    return [sys.executable, TINY, "--port", str(port), *args]


async def test_start_waits_for_health_and_stop_leaves_nothing(tmp_path: Path) -> None:
    port = free_port()
    child_file = tmp_path / "child"
    engine = EngineProcess(tiny(port, "--child-pid-file", str(child_file)), url=f"http://127.0.0.1:{port}",
                           poll_interval_s=0.05, stop_timeout_s=5)
    async with engine:
        assert engine.running
        leader, child = engine.pid, int(child_file.read_text())
        assert os.getpgid(child) == os.getpgid(leader) == leader  # its own group, children included
        assert os.getpgid(leader) != os.getpgid(0)
    assert not alive(leader)
    wait_until(lambda: not alive(child))  # SIGTERM/SIGKILL reached it; it takes a moment to die
    await engine.stop()  # idempotent


async def test_its_output_goes_to_the_log_file_given(tmp_path: Path) -> None:
    port = free_port()
    script = "import sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr); raise SystemExit(7)"
    with open(tmp_path / "engine.log", "wb") as log:
        engine = EngineProcess([sys.executable, "-c", script], url=f"http://127.0.0.1:{port}", poll_interval_s=0.05,
                               log=log)
        with pytest.raises(EngineStartError):
            await engine.start()
    assert (tmp_path / "engine.log").read_text().splitlines() == ["to stdout", "to stderr"]


async def test_engine_that_exits_early_fails_the_start() -> None:
    port = free_port()
    engine = EngineProcess([sys.executable, "-c", "raise SystemExit(7)"], url=f"http://127.0.0.1:{port}",
                           poll_interval_s=0.05)
    with pytest.raises(EngineStartError, match="exited with code 7"):
        await engine.start()


async def test_engine_that_never_gets_ready_times_out_and_is_killed() -> None:
    port = free_port()
    engine = EngineProcess(tiny(port, "--never-ready"), url=f"http://127.0.0.1:{port}", start_timeout_s=0.5,
                           poll_interval_s=0.05, stop_timeout_s=2)
    with pytest.raises(EngineStartError, match="within 0.5 s"):
        await engine.start()
    assert not engine.running


async def test_dead_engine_is_restarted_with_backoff_then_given_up(tmp_path: Path) -> None:
    import anyio

    port = free_port()
    starts = tmp_path / "starts"
    engine = EngineProcess(tiny(port, "--exit-after", "0.3", "--starts-file", str(starts)),
                           url=f"http://127.0.0.1:{port}", poll_interval_s=0.05, max_restarts=2,
                           restart_backoff_s=0.05)
    began = time.monotonic()
    await engine.start()
    with anyio.fail_after(10):
        while not engine.gave_up:
            await anyio.sleep(0.02)
    assert engine.restarts == 2 and len(starts.read_text().split()) == 3
    assert time.monotonic() - began >= 0.3 * 3 + 0.05 + 0.1  # three runs, backoff 0.05 then 0.1
    await engine.stop()


async def test_sigterm_ignoring_engine_is_killed_after_the_grace_period() -> None:
    port = free_port()
    script = ("import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"subprocess.run([sys.executable, {TINY!r}, '--port', '{port}'])")
    engine = EngineProcess([sys.executable, "-c", script], url=f"http://127.0.0.1:{port}", poll_interval_s=0.05,
                           stop_timeout_s=0.3)
    await engine.start()
    leader = engine.pid
    began = time.monotonic()
    await engine.stop()
    assert time.monotonic() - began < 5
    wait_until(lambda: group_members(leader) == [])  # leader and child both gone

