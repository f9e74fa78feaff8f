"""Evaluation inputs as pure, seeded functions of the books and a tokenizer: perplexity documents and
windows, and passkey prompts (the paper's, built by :mod:`server.passkey`, and a real-prose variant).

Length convention, the same for every experiment: a cell of length ``n`` is a request whose planned
context is ``n`` tokens, prompt plus ``max_tokens``. That is the quantity the plugin's policy reads, so
a cell of length ``n <= L`` runs at scale 1 (plain RoPE) under the plugin. Concretely:

- perplexity (max_tokens 1): the prompt is BOS + ``n - 2`` text tokens, and those ``n - 2`` are scored;
- passkey (max_tokens :data:`server.passkey.MAX_NEW_TOKENS` = 10): the prompt has ``n - 10`` tokens.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from server.passkey import (
    MAX_NEW_TOKENS,
    QUESTION,
    TASK,
    PasskeyBuildError,
    build_passkey_prompt,
    draw,
    info_line,
)

REPO = Path(__file__).resolve().parents[2]
BOOKS = ("katrine", "news-from-nowhere")
PERPLEXITY_NEW_TOKENS = 1
_START = re.compile(r"^\*\*\*\s*START OF.*$", re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF.*$", re.MULTILINE)

Encode = Callable[[str], list[int]]


def books_dir() -> Path:
    """``$ROPESERVE_SHARED/data/books``, by default ``shared/data/books`` beside the repository."""
    return Path(os.environ.get("ROPESERVE_SHARED", REPO.parent / "shared")) / "data" / "books"


def book_body(text: str) -> str:
    """The text between Project Gutenberg's START and END marker lines (all of it when they are absent),
    without the licence header and footer, stripped of surrounding blank space."""
    start, end = _START.search(text), _END.search(text)
    body = text[start.end() if start else 0:end.start() if end else len(text)]
    return body.strip()


def read_book(name: str) -> str:
    if name not in BOOKS:
        raise ValueError(f"unknown book {name!r}; known: {', '.join(BOOKS)}")
    return book_body((books_dir() / f"{name}.txt").read_text(encoding="utf-8"))


# --- perplexity ----------------------------------------------------------------------------------------

def _check_length(context: int, minimum: int) -> None:
    if isinstance(context, bool) or not isinstance(context, int) or context < minimum:
        raise ValueError(f"context length must be an integer >= {minimum} (got {context!r})")


def truncated_document(tokens: Sequence[int], context: int, bos: int, *, offset: int = 0) -> list[int]:
    """The paper's truncated-document input at planned context ``context``: BOS + ``context - 2`` tokens of
    the document from token ``offset`` on (the prompt; the one generated token makes ``context``)."""
    _check_length(context, 3)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an integer >= 0 (got {offset!r})")
    if offset + context - 2 > len(tokens):
        raise ValueError(f"the document has {len(tokens)} tokens, fewer than {offset} + {context - 2}")
    return [bos, *tokens[offset:offset + context - 2]]


def windows(tokens: Sequence[int], context: int, count: int, *, offset: int, bos: int) -> list[list[int]]:
    """``count`` non-overlapping windows (BOS + ``context - 2`` tokens each), the first at ``offset``."""
    _check_length(context, 3)
    if count < 1 or offset < 0:
        raise ValueError(f"count must be >= 1 and offset >= 0 (got {count}, {offset})")
    width = context - 2
    if offset + count * width > len(tokens):
        raise ValueError(f"{count} windows of {width} tokens from {offset} need {offset + count * width} "
                         f"tokens; the document has {len(tokens)}")
    return [[bos, *tokens[offset + i * width:offset + (i + 1) * width]] for i in range(count)]


def window_count(context: int, budget: int, available: int, offset: int) -> int:
    """How many windows of ``context`` to score: ``budget // context`` (at least one), no more than fit."""
    fit = (available - offset) // (context - 2)
    return max(1, min(budget // context, fit))


def scored(prompt_logprobs: Sequence[float | None]) -> list[float]:
    """The logprobs of the scored tokens: all but the first (BOS, which has none)."""
    if not prompt_logprobs or prompt_logprobs[0] is not None:
        raise ValueError("prompt logprobs must start with None (the first token is not predicted)")
    rest = list(prompt_logprobs[1:])
    if any(lp is None for lp in rest):
        raise ValueError("a prompt logprob is missing")
    return rest


# --- passkey -------------------------------------------------------------------------------------------

VARIANTS = ("paper", "prose")


def passkey_prompt(variant: str, context: int, depth: float, seed: int, encode: Encode,
                   book_tokens: Callable[[str], Sequence[int]]) -> tuple[list[int], int]:
    """Token ids and key of a passkey prompt whose planned context (prompt + 10 new tokens) is ``context``.

    ``paper``: :func:`server.passkey.build_passkey_prompt` with the filler haystack, asked for exactly
    ``context - 10`` tokens (a token fewer, up to 8 times, when the tokenizer cannot land on it).
    ``prose``: the same task, needle and question (the key drawn by :func:`server.passkey.draw`), around a
    haystack of real prose: ``context - 10 - fixed`` consecutive tokens of a book (book and start drawn
    from ``seed``), the needle inserted at token depth ``depth``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown passkey variant {variant!r}; known: {', '.join(VARIANTS)}")
    target = context - MAX_NEW_TOKENS
    if variant == "paper":
        for attempt in range(9):
            try:
                prompt = build_passkey_prompt(target - attempt, lambda text: len(encode(text)), seed=seed,
                                              depth=depth, tolerance=0.0)
            except PasskeyBuildError:
                continue
            ids = encode(prompt.text)
            return ids, prompt.key
        raise PasskeyBuildError(f"no passkey prompt of {target - 8}..{target} tokens")
    key, depth = draw(seed, depth)
    head, needle, tail = encode(TASK + "\n"), encode("\n" + info_line(key) + "\n"), encode("\n" + QUESTION)
    hay_len = target - len(head) - len(needle) - len(tail)
    if hay_len < 0:
        raise PasskeyBuildError(f"a prose passkey prompt needs more than {target} tokens")
    rng = random.Random(f"prose-haystack:{seed}")
    book = BOOKS[rng.randrange(len(BOOKS))]
    tokens = book_tokens(book)
    if hay_len > len(tokens):
        raise PasskeyBuildError(f"{book} has {len(tokens)} tokens, fewer than the {hay_len} asked for")
    start = rng.randrange(len(tokens) - hay_len + 1)
    hay = list(tokens[start:start + hay_len])
    cut = round(depth * hay_len)
    return head + hay[:cut] + needle + hay[cut:] + tail, key
