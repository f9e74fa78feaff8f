"""Shared fixtures: the default model, its tokenizer, the evaluation books, and engine helpers.

Tests that start a real vLLM engine are marked ``engine``; each such module starts its engines once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$ROPESERVE_SHARED`` or the ``shared/`` folder beside the repository."""
    return Path(os.environ.get("ROPESERVE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def model_dir() -> str:
    from server.default_model import prepare

    return str(prepare())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def book_tokens(tokenizer) -> list[int]:
    """Token ids of the first novel in shared/data/books (about 90k tokens)."""
    text = (shared_dir() / "data" / "books" / "katrine.txt").read_text(encoding="utf-8")
    return tokenizer(text, add_special_tokens=False).input_ids

