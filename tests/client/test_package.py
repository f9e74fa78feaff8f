"""ropeserve-client stands alone: it declares httpx and pydantic as its only dependencies (rich only as
the optional ``cli`` extra), and importing it, CLI included, adds neither vLLM, torch, the server, nor
rich to what httpx and pydantic import themselves."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"


def test_declared_dependencies():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert names == {"httpx", "pydantic"}
    assert {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] for d in project["optional-dependencies"]["cli"]} == {"rich"}
    assert project["scripts"]["ropeserve-client"] == "ropeserve_client.cli:main"


def test_import_pulls_in_nothing_heavy():
    # Measured against what httpx and pydantic import by themselves (httpx imports rich for its own
    # CLI whenever rich is installed), so only what ropeserve_client adds counts.
    code = (
        "import sys\n"
        "heavy = {'torch', 'vllm', 'server', 'rope_ext', 'fastapi', 'rich', 'tqdm', 'transformers', 'numpy'}\n"
        "top = lambda: {m.split('.')[0] for m in sys.modules}\n"
        "import httpx, pydantic\n"
        "before = top()\n"
        "import ropeserve_client, ropeserve_client.cli\n"
        "print(sorted(heavy & (top() - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=CLIENT)
    assert out.stdout.strip() == "[]"
