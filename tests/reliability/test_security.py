"""Security checks of the repository itself: no secret committed, every dependency pinned, and the gateway's
runtime dependencies all in the lock. (Keys compared in constant time and never logged, the passkey route
behind the key and one run at a time: tests/server/test_access.py and test_passkey_route.py; the image runs
as non-root with no secret baked in: tests/deploy/test_containers.py.)"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Shapes of real credentials (a placeholder such as "sk-change-me" or "sk-test" does not match).
SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "OpenAI-style key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9]{32,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "password assignment": re.compile(r"(?i)\b(?:password|passwd|secret_key)\s*[:=]\s*['\"][^'\"\s$]{8,}['\"]"),
}
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in names.decode().split("\0") if name]


def test_no_secret_in_the_repository() -> None:
    found = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # binaries (plots), removed files
            continue
        for kind, pattern in SECRET_PATTERNS.items():
            for match in pattern.finditer(text):
                found.append(f"{path.relative_to(REPO)}: {kind}: {match.group(0)[:12]}...")
    assert not found, found


def test_the_secret_scan_finds_what_it_looks_for() -> None:
    fake = "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nAKIA" + "ABCDEFGHIJKLMNOP" + "\nsk-" + "a1" * 20
    assert {kind for kind, pattern in SECRET_PATTERNS.items() if pattern.search(fake)} == {
        "private key", "AWS access key", "OpenAI-style key"}


def lock_lines(name: str) -> list[str]:
    lines = (REPO / "requirements" / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_every_locked_dependency_is_pinned_exactly() -> None:
    for name in ("cpu.lock", "cuda.lock"):
        unpinned = [line for line in lock_lines(name) if not line.startswith("--") and not PIN.match(line)]
        assert not unpinned, f"{name}: {unpinned}"


def test_the_lock_holds_every_dependency_of_the_project_and_its_tests() -> None:
    locked = {re.split(r"[=\[]", line)[0].lower().replace("_", "-") for line in lock_lines("cpu.lock")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    wanted += project["optional-dependencies"]["cpu"]
    names = {re.split(r"[<>=!~\[ ;]", spec)[0].lower().replace("_", "-") for spec in wanted}
    assert names - locked == set()
