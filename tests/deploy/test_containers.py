"""The Dockerfile (hadolint, and the promises hadolint cannot check: TARGET, setup.sh, non-root,
HEALTHCHECK on /readyz, no secrets) and the compose stack (Docker Compose v2 validates it against the
compose specification with no engine; then the wiring: engine and gateway agree with the gateway's
settings, Prometheus scrapes both, the Grafana dashboard only queries metrics the gateway exports)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, header_comment, load_all

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
DEFAULT_ROPE_THETA = 100000.0  # rope_theta of the default model's config.json (ROPE_NOTES.md section 4)


# -- Dockerfile -----------------------------------------------------------------------------------------
def run_hadolint(hadolint: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint, "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_clean(hadolint):
    result = run_hadolint(hadolint, DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && ls\n")
    result = run_hadolint(hadolint, bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout  # `latest` tag, `cd` in RUN


def stages(text: str) -> list[tuple[str, str, list[str]]]:
    """(image, stage name, instructions) per FROM, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: list[tuple[str, str, list[str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            out.append((m.group(1), m.group(2) or "", []))
        elif out:
            out[-1][2].append(line)
    return out


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_one_base_image_so_a_build_pulls_only_what_it_uses(dockerfile):
    """The classic builder (Debian's docker.io) builds every stage: a second base for the other target
    would pull it too. One BASE_IMAGE, the other stages built on it; no BuildKit frontend to pull."""
    assert re.search(r"^ARG TARGET=cpu$", dockerfile, re.M)
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", dockerfile, re.M)
    assert [(image, name) for image, name, _ in stages(dockerfile)] == [
        ("${BASE_IMAGE}", "base"), ("base", "build"), ("base", "runtime")]
    assert "# syntax=" not in dockerfile and "nvidia/cuda:" in dockerfile  # CUDA's base, documented


def test_built_by_the_setup_script_make_uses(dockerfile):
    (build,) = [ins for _, name, ins in stages(dockerfile) if name == "build"]
    assert any("scripts/image_setup.sh" in i for i in build if i.startswith("RUN"))
    assert "scripts/setup.sh" in (REPO / "scripts" / "image_setup.sh").read_text()  # which runs setup.sh
    assert "scripts/setup.sh" in (REPO / "Makefile").read_text()  # the same script `make` (and CI) run
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_runtime_is_last_non_root_and_healthchecked(dockerfile):
    image, name, ins = stages(dockerfile)[-1]
    assert name == "runtime"
    users = [i.split(None, 1)[1] for i in ins if i.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [i for i in ins if i.upper().startswith("HEALTHCHECK")]
    assert "/readyz" in health and "passkey" not in health
    assert any(i.startswith("COPY --from=build") for i in ins)
    assert not any("build-essential" in i for i in ins)  # no build tool chain beyond what runs need


def test_the_runtime_can_run_the_compiled_mode(dockerfile):
    """vLLM's compiled mode (the engine's default) builds C++ kernels with Python bindings at run time
    (inductor on CPU, Triton's launcher on CUDA): the base every stage runs on has g++ and the target
    Python's headers, and the offline base image is made with every package the CPU image's base stage
    asks for (one list is written twice, in the Dockerfile and in scripts/container_images.sh: this keeps
    them in step, so the offline build never reaches for a package index)."""
    (base,) = [ins for _, name, ins in stages(dockerfile) if name == "base"]
    (packages,) = [i for i in base if i.startswith("RUN") and "packages=" in i]
    assert "g++" in packages and '"$python-dev"' in packages
    wanted = {p.strip('"').replace("$python", "python3.11")
              for p in re.search(r"packages=\(([^)]*)\)", packages).group(1).split()}
    script = (REPO / "scripts" / "container_images.sh").read_text()
    base_packages = re.search(r"^BASE_PACKAGES=(\S+)", script, re.M).group(1).split(",")
    assert {"g++", "python3.11-dev"} <= wanted <= set(base_packages), wanted - set(base_packages)


def test_no_secret_baked_in(dockerfile):
    for line in re.sub(r"\\\n\s*", " ", dockerfile).splitlines():
        if re.match(r"\s*(ENV|ARG)\s", line):
            for name, value in re.findall(r"([A-Z_]+)=(\S*)", line):
                if re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", name):
                    assert value in ("", '""'), f"{name} has a value in the Dockerfile"
    ignored = [line for line in (REPO / ".dockerignore").read_text().split() if not line.startswith("#")]
    assert {".env*", "*.env"} <= set(ignored)


def test_the_build_context_leaves_out_every_local_environment():
    """The repository's own environments (.venv; .venv34, which `make test` makes while the container tier
    builds; .venv-llama of bench/cpu_speed.py) and .git are gigabytes the image must not carry."""
    ignored = [line for line in (REPO / ".dockerignore").read_text().split() if not line.startswith("#")]
    for name in (".git", ".venv", ".venv34", ".venv-llama"):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in ignored), name


def test_the_dependencies_are_a_layer_a_source_change_reuses(dockerfile):
    """The build stage installs the lock from the lock, the set-up scripts and the wheelhouse alone, before
    the source tree is copied; then the project and the model, both through the setup script make uses."""
    (build,) = [ins for _, name, ins in stages(dockerfile) if name == "build"]
    source = build.index("COPY . .")
    before = " ".join(build[:source])
    assert "COPY requirements/" in before and "scripts/image_setup.sh --deps-only" in before
    assert any(i.startswith("RUN scripts/image_setup.sh") and "--deps-only" not in i for i in build[source:])


def test_header_comments():
    for path in [DOCKERFILE, COMPOSE, COMPOSE_GPU, PROMETHEUS, REPO / ".hadolint.yaml", REPO / ".dockerignore",
                 *GRAFANA.rglob("*.yml")]:
        assert header_comment(path), path


# -- docker compose ---------------------------------------------------------------------------------------
def compose_config(compose: list[str], *files: Path, profiles: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [*compose]
    for f in files:
        args += ["-f", str(f)]
    for p in profiles:
        args += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROPESERVE_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=60)


@pytest.fixture(scope="module")
def cpu_stack(compose) -> dict:
    result = compose_config(compose, COMPOSE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gpu_stack(compose) -> dict:
    result = compose_config(compose, COMPOSE, COMPOSE_GPU, profiles=("grafana",))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_rejects_what_the_specification_forbids(compose, tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    shm_size: 2gb\n", "    shm_size: 2gb\n    gpus_please: true\n"))
    result = compose_config(compose, bad)
    assert result.returncode != 0 and "gpus_please" in result.stderr


def test_services_and_profile(cpu_stack, gpu_stack):
    assert set(cpu_stack["services"]) == {"engine", "gateway", "prometheus"}
    assert set(gpu_stack["services"]) == {"engine", "gateway", "prometheus", "grafana"}


def engine_flags(service: dict) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in service["command"] if arg.startswith("--") and "=" in arg)


def test_engine_matches_the_gateway_settings(cpu_stack, gpu_stack, clean_env):
    from server.engine_process import engine_command, hf_overrides
    from server.settings import GatewaySettings

    settings = GatewaySettings()  # the defaults, which the stack's gateway runs with
    scaling = settings.rope_scaling()
    for stack, entry in ((cpu_stack, "server.cpu_engine"), (gpu_stack, "vllm.entrypoints.openai.api_server")):
        engine = stack["services"]["engine"]
        assert engine["command"][:3] == ["python", "-m", entry]
        flags = engine_flags(engine)
        assert json.loads(flags["hf-overrides"]) == hf_overrides(scaling, DEFAULT_ROPE_THETA)
        assert int(flags["max-model-len"]) == scaling.max_context
        assert flags["served-model-name"] == settings.served_model_name
        assert flags["port"] == "8001" and flags["host"] == "0.0.0.0"
        assert "8001" in engine["healthcheck"]["test"][-1] and "/health" in engine["healthcheck"]["test"][-1]
    # vLLM's compiled mode, as the embedded engine runs (the faster mode on CPU; docs/RESULTS.md)
    embedded = engine_command(settings, model_dir=Path("/m"), port=8001, rope_theta=DEFAULT_ROPE_THETA,
                              dtype="float32")
    assert "--enforce-eager" not in cpu_stack["services"]["engine"]["command"] and "--enforce-eager" not in embedded


def test_cpu_engine_dtype_by_capability(cpu_stack, gpu_stack, clean_env):
    """The CPU engine's dtype is `auto`, resolved in the container by the CPU's flags (server/cpu_engine.py,
    the embedded engine's rule), and its default KV cache holds one full request even in float32; the GPU
    engine keeps vLLM's own default dtype."""
    from server.cpu_dtype import kvcache_gib_needed
    from server.cpu_engine import split_dtype
    from server.settings import GatewaySettings

    cpu_engine = cpu_stack["services"]["engine"]
    assert engine_flags(cpu_engine)["dtype"] == GatewaySettings().engine_dtype == "auto"
    assert split_dtype(cpu_engine["command"][3:])[0] == "auto"
    full = kvcache_gib_needed(GatewaySettings().rope_scaling().max_context, "float32")
    assert float(cpu_engine["environment"]["VLLM_CPU_KVCACHE_SPACE"]) >= full
    assert "dtype" not in engine_flags(gpu_stack["services"]["engine"])


def test_gateway_wiring(cpu_stack):
    gateway = cpu_stack["services"]["gateway"]
    env = gateway["environment"]
    assert env["ROPESERVE_ENGINE_URLS"] == "http://engine:8001"
    assert env["ROPESERVE_HOST"] == "0.0.0.0" and env["ROPESERVE_API_KEYS"] == ""  # keys only from outside
    assert gateway["depends_on"]["engine"]["condition"] == "service_healthy"
    (port,) = gateway["ports"]
    assert (port["published"], port["target"], port["host_ip"]) == ("8000", 8000, "127.0.0.1")
    assert "/readyz" in gateway["healthcheck"]["test"][-1] and "passkey" not in json.dumps(gateway)
    assert gateway["image"] == cpu_stack["services"]["engine"]["image"] == "ropeserve:cpu"
    assert gateway["build"]["args"] == {"TARGET": "cpu", "BASE_IMAGE": "debian:bookworm-slim"}


def test_gpu_override(gpu_stack):
    for name in ("engine", "gateway"):
        assert gpu_stack["services"][name]["build"]["args"]["TARGET"] == "cuda"
        assert gpu_stack["services"][name]["image"] == "ropeserve:cuda"
    (device,) = gpu_stack["services"]["engine"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "--enforce-eager" not in gpu_stack["services"]["engine"]["command"]


def test_gateway_settings_from_compose_are_valid(cpu_stack, clean_env, monkeypatch):
    from server.settings import GatewaySettings

    for key, value in cpu_stack["services"]["gateway"]["environment"].items():
        monkeypatch.setenv(key, value or "")
    settings = GatewaySettings()
    assert settings.engine_urls == ["http://engine:8001"] and not settings.embedded


# -- Prometheus and Grafana ---------------------------------------------------------------------------------
def test_prometheus_scrapes_both(cpu_stack):
    (config,) = load_all(PROMETHEUS)
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway:8000", "engine:8001"}
    for target in targets:
        service, port = target.split(":")
        assert service in cpu_stack["services"]
    mounts = {v["target"]: v for v in cpu_stack["services"]["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == PROMETHEUS


def gateway_metric_names() -> set[str]:
    """Every sample name the gateway's /metrics can export (histogram and counter suffixes included)."""
    from server.metrics import GatewayMetrics

    metrics = GatewayMetrics([1.0, 2.0, 4.0, 8.0])
    metrics.requests.labels("/v1/completions", "POST", "200").inc()
    metrics.latency.labels("/v1/completions").observe(0.1)
    metrics.prompt_tokens.labels("/v1/completions").inc()
    metrics.generated_tokens.labels("/v1/completions").inc()
    metrics.passkey_runs.labels("passed").inc()
    names = {line.split("{")[0].split()[0] for line in metrics.render().decode().splitlines()
             if line and not line.startswith("#")}
    # Read from the engine pool at scrape time (not rendered without a pool).
    return names | {"ropeserve_engine_healthy", "ropeserve_engine_in_flight",
                    "ropeserve_engine_consecutive_failures", "ropeserve_ready"}


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((GRAFANA / "dashboards" / "ropeserve.json").read_text())
    exported = gateway_metric_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(ropeserve_[a-z_]+)", e)}
    assert used and used <= exported, used - exported
    assert all(re.findall(r"\bvllm:[a-z_]+", e) == ["vllm:generation_tokens_total"] for e in exprs if "vllm:" in e)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "latency", "tokens per second", "rope factor", "passkey"):
        assert topic in titles, topic
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_grafana_provisioning_is_wired(gpu_stack):
    (datasources,) = load_all(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    dashboard = json.loads((GRAFANA / "dashboards" / "ropeserve.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    (providers,) = load_all(GRAFANA / "provisioning" / "dashboards" / "ropeserve.yml")
    path = providers["providers"][0]["options"]["path"]
    grafana = gpu_stack["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts[path] == GRAFANA / "dashboards"
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert grafana["profiles"] == ["grafana"]


def test_yaml_parses():
    for path in [COMPOSE, COMPOSE_GPU, PROMETHEUS, *GRAFANA.rglob("*.yml")]:
        assert load_all(path), path
    assert yaml.safe_load((REPO / ".hadolint.yaml").read_text())["failure-threshold"] == "info"
