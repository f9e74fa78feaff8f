"""``ropeserve serve`` as a real process: it serves, and SIGTERM or Ctrl-C (SIGINT) stops it cleanly, at any
point, leaving no engine process behind (embedded mode runs a stand-in engine, see cli_harness.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, main
from server.engine_process import free_port
from tests.server.fake_engine import FakeEngine
from tests.server.servers import serve_in_thread
from tests.server.helpers import alive, wait_until

REPO = Path(__file__).resolve().parents[2]
HARNESS = str(Path(__file__).with_name("cli_harness.py"))


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROPESERVE_")}
    clean["PYTHONPATH"] = str(REPO)
    return clean


def test_parser_has_serve_with_host_and_port() -> None:
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9"])
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == "9"
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_invalid_settings_exit_2_without_echoing_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "nope", "--api-keys", "sk-hush-hush", "--rope-max-factor", "0.5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "port" in err and "rope_max_factor" in err and "sk-hush-hush" not in err


def test_serve_with_engine_urls_stops_on_sigterm() -> None:
    engine = FakeEngine()
    port = free_port()
    with serve_in_thread(engine.app) as engine_url:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                                    "--engine-urls", engine_url, "--served-model-name", "fake-model"],
                                   cwd=REPO, env=env())
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: ready(url), timeout=60)
            response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
            assert response.status_code == 200 and response.headers["x-rope-factor"] == "1"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
            process.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_embedded_mode_stops_the_engine_with_the_gateway(tmp_path: Path, sig: int) -> None:
    port, engine_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, HARNESS, str(port), str(engine_port), str(tmp_path)], env=env())
    try:
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), timeout=60)
        engine_pid = int((tmp_path / "starts").read_text().split()[0])
        child_pid = int((tmp_path / "child").read_text())
        assert alive(engine_pid) and alive(child_pid)
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
        wait_until(lambda: not alive(engine_pid) and not alive(child_pid), timeout=10)
    finally:
        process.kill()
        process.wait()


def test_signal_while_the_engine_starts_stops_everything(tmp_path: Path) -> None:
    port, engine_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, HARNESS, str(port), str(engine_port), str(tmp_path),
                                "--never-ready"], env=env())
    try:
        wait_until(lambda: (tmp_path / "child").exists() and (tmp_path / "child").read_text(), timeout=60)
        engine_pid = int((tmp_path / "starts").read_text().split()[0])
        child_pid = int((tmp_path / "child").read_text())
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        wait_until(lambda: not alive(engine_pid) and not alive(child_pid), timeout=10)
        with pytest.raises(httpx.ConnectError):  # it never served
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    finally:
        process.kill()
        process.wait()
