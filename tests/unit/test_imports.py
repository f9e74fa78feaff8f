"""``import rope_ext`` stays a pure-math import: it must not pull in vLLM or FastAPI (checked in a fresh
interpreter, since this test session may have imported them already)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

CHECK = """
import sys
import rope_ext
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"vllm", "fastapi", "transformers", "starlette"})
print(",".join(heavy))
assert "torch" in sys.modules
"""


def test_import_rope_ext_pulls_in_neither_vllm_nor_fastapi() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
