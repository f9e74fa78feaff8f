"""The worker's cores (server/cpu_cores.py): every core of a small machine, vLLM's binding elsewhere, the
user's setting always; the embedded engine gets them in its environment and logs why."""

from __future__ import annotations

import pytest

from server.cpu_cores import BIND, SMALL_MACHINE_CPUS, allowed_cpus, worker_binding
from server.engine_process import embedded_engine, engine_env
from server.settings import GatewaySettings


@pytest.mark.parametrize("cpus", [[0], [0, 1], [2, 3], [0, 1, 2, 3]])
def test_a_small_machine_gives_the_worker_every_core(cpus: list[int]) -> None:
    extra, line = worker_binding({}, cpus)
    assert extra == {BIND: ",".join(map(str, cpus))}  # the allowed set as it is (a container's cpuset: 2,3)
    assert line.startswith(f"worker cores {extra[BIND]}: all {len(cpus)} CPUs") and BIND in line


def test_a_larger_machine_keeps_vllms_binding() -> None:
    extra, line = worker_binding({}, list(range(SMALL_MACHINE_CPUS + 1)))
    assert extra == {BIND: "auto"} and "vLLM's binding" in line


@pytest.mark.parametrize("cpus", [[0, 1], list(range(32))])
def test_the_users_setting_wins_and_empty_means_unset(cpus: list[int]) -> None:
    assert worker_binding({BIND: "1"}, cpus) == ({}, f"worker cores: {BIND}=1 (set explicitly)")
    assert worker_binding({BIND: ""}, cpus) == worker_binding({}, cpus)


def test_allowed_cpus_is_this_process_affinity() -> None:
    import os

    assert allowed_cpus() == sorted(os.sched_getaffinity(0)) and allowed_cpus()


def test_engine_env_adds_the_binding_only_when_given_cpus() -> None:
    settings = GatewaySettings()
    assert BIND not in engine_env(settings, {})
    assert engine_env(settings, {}, cpus=[0, 1])[BIND] == "0,1"
    assert engine_env(settings, {BIND: "0"}, cpus=[0, 1])[BIND] == "0"


@pytest.mark.anyio
async def test_the_embedded_engine_binds_and_logs(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "config.json").write_text('{"rope_theta": 10000.0}')
    monkeypatch.delenv(BIND, raising=False)
    settings = GatewaySettings(model_dir=tmp_path, engine_port=18999)
    with caplog.at_level("INFO", logger="server.engine_process"):
        engine = await embedded_engine(settings, cpu_flags=lambda: {"avx2"}, cpus=lambda: [0, 1])
    assert engine.env[BIND] == "0,1"
    assert worker_binding({}, [0, 1])[1] in caplog.messages
