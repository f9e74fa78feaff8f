"""The paper's passkey-retrieval prompt, built to a target token count: pure, seeded, tokenizer-agnostic.

The prompt is the YaRN reference code's (``passkey.py``; ROPE_NOTES.md section 5)::

    "\\n".join([TASK, haystack[:cut], f"The pass key is {key}. Remember it. {key} is the pass key.",
               haystack[cut:], "What is the pass key? The pass key is"])

where the haystack is the filler sentence repeated (joined by spaces) and cut to a number of characters,
split at character depth ``round(depth * len(haystack))`` (moved back to a word start, see :func:`cut_at`),
and ``key = randint(1, 50000)``. Everything
random comes from ``random.Random(seed)``: the same (target, seed, depth) gives the same prompt with the same
tokenizer. The haystack length is searched (secant steps, then bisection, then a few neighbours) until the
whole prompt has the target token count, or is within ``tolerance`` (1 %) of it. The caller supplies
the token counting, sync or async, so the gateway (its own tokenizer or the engine's /tokenize), the
client and the benchmarks share this one builder::

    prompt = build_passkey_prompt(4096, lambda text: len(tokenizer.encode(text)), seed=3)
    prompt = await abuild_passkey_prompt(4096, count_via_engine, seed=3, depth=0.5)
    passed = parse_answer(continuation) == prompt.key       # greedy, MAX_NEW_TOKENS new tokens
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Awaitable, Callable, Generator

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 10
KEY_RANGE = (1, 50000)
_MAX_MEASUREMENTS = 40
_CHARS_PER_TOKEN_GUESS = 4
_NEIGHBOURS = 12


class PasskeyBuildError(ValueError):
    """No prompt of the requested size can be built (too small, or the tokenizer never lands close enough)."""


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: int
    depth: float
    seed: int
    target_tokens: int
    tokens: int
    haystack_chars: int


def info_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def haystack(chars: int) -> str:
    """The first ``chars`` characters of the filler repeated and joined by spaces."""
    unit = FILLER + " "
    return (unit * (chars // len(unit) + 1))[:chars]


def cut_at(hay: str, depth: float) -> int:
    """Where the haystack splits: at character ``round(depth * len)``, moved back to the start of the word
    it falls in. (The reference code cuts anywhere; a word cut in two costs a token, and the count would
    then jump by two as the haystack grows, missing some targets.)"""
    cut = round(depth * len(hay))
    if 0 < cut < len(hay) and hay[cut - 1] != " ":
        cut = hay.rfind(" ", 0, cut) + 1
    return cut


def render(key: int, depth: float, haystack_chars: int) -> str:
    """The full prompt for a key, a depth in [0, 1] and a haystack length in characters."""
    hay = haystack(haystack_chars)
    cut = cut_at(hay, depth)
    return "\n".join([TASK, hay[:cut], info_line(key), hay[cut:], QUESTION])


def draw(seed: int, depth: float | None = None) -> tuple[int, float]:
    """The key and depth of a seed (the key is drawn first, so it does not depend on a given depth)."""
    rng = random.Random(seed)
    key = rng.randint(*KEY_RANGE)
    drawn = rng.random()
    return key, drawn if depth is None else depth


_ANSWER = re.compile(r"\d+")


def parse_answer(text: str) -> int | None:
    """The first integer in a continuation, as the reference code scores it; None when there is none."""
    match = _ANSWER.search(text)
    return int(match.group()) if match else None


def _check_args(target_tokens: int, depth: float | None, tolerance: float) -> None:
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise PasskeyBuildError(f"target_tokens must be an integer >= 1 (got {target_tokens!r})")
    if depth is not None and not (isinstance(depth, (int, float)) and 0 <= depth <= 1):
        raise PasskeyBuildError(f"depth must be a number in [0, 1] (got {depth!r})")
    if not 0 <= tolerance < 1:
        raise PasskeyBuildError(f"tolerance must be in [0, 1) (got {tolerance!r})")


def _search(target: int, key: int, depth: float, tolerance: float, at_most: bool = False
            ) -> Generator[str, int, tuple[int, int]]:
    """Sans-IO search for the haystack length: yields prompt texts, receives their token counts, returns
    ``(haystack_chars, tokens)``. With ``at_most``, only counts at or below the target are accepted."""
    allowed = math.floor(tolerance * target)
    seen: dict[int, int] = {}

    def gap(tokens: int) -> float:
        return math.inf if at_most and tokens > target else abs(tokens - target)

    def measure(chars: int) -> Generator[str, int, int]:
        if chars not in seen:
            seen[chars] = yield render(key, depth, chars)
        return seen[chars]

    base = yield from measure(0)
    if base > target:
        raise PasskeyBuildError(f"a passkey prompt needs at least {base} tokens with this tokenizer "
                                f"(asked for {target})")
    lo, hi = (0, base), None  # (chars, tokens) with tokens < target, and with tokens > target
    chars = max(1, (target - base) * _CHARS_PER_TOKEN_GUESS)
    while len(seen) < _MAX_MEASUREMENTS:
        tokens = yield from measure(chars)
        if tokens == target:
            return chars, tokens
        if tokens < target:
            lo = max(lo, (chars, tokens))
        elif hi is None or chars < hi[0]:
            hi = (chars, tokens)
        if hi is None:  # still below: extrapolate with the rate seen so far, at least doubling cautiously
            rate = (tokens - base) / chars if tokens > base else 0
            step = (target - tokens) / rate if rate > 0 else chars
            chars = chars + max(1, math.ceil(step))
            continue
        if hi[0] - lo[0] <= 1:
            break
        # secant between the brackets, kept strictly inside them so the bracket always shrinks
        guess = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
        chars = min(max(round(guess), lo[0] + 1), hi[0] - 1)
        if chars in seen:
            chars = (lo[0] + hi[0]) // 2
    def best() -> int:
        return min(seen, key=lambda c: (gap(seen[c]), c))

    # The count can jump by two where one more character both starts a token at the end and moves the
    # cut; a few neighbours past the bracket usually land on the target.
    edge = hi[0] if hi is not None else chars
    for step in range(1, _NEIGHBOURS + 1):
        if gap(seen[best()]) <= allowed or len(seen) >= _MAX_MEASUREMENTS:
            break
        for candidate in (edge + step, lo[0] - step):
            if candidate >= 0:
                yield from measure(candidate)
    best_chars = best()
    if gap(seen[best_chars]) <= allowed:
        return best_chars, seen[best_chars]
    raise PasskeyBuildError(f"could not build a passkey prompt of {target} tokens within {tolerance:.0%}"
                            f"{' below' if at_most else ''} (closest: {seen[best_chars]} tokens)")


def _finish(target: int, seed: int, key: int, depth: float, found: tuple[int, int]) -> PasskeyPrompt:
    chars, tokens = found
    return PasskeyPrompt(render(key, depth, chars), key, depth, seed, target, tokens, chars)


def build_passkey_prompt(target_tokens: int, count_tokens: Callable[[str], int], *, seed: int = 0,
                         depth: float | None = None, tolerance: float = 0.01, at_most: bool = False
                         ) -> PasskeyPrompt:
    """A passkey prompt of ``target_tokens`` tokens as counted by ``count_tokens`` (see module docstring);
    with ``at_most``, never more than ``target_tokens`` (the tolerance applies below only)."""
    _check_args(target_tokens, depth, tolerance)
    key, depth = draw(seed, depth)
    search = _search(target_tokens, key, depth, tolerance, at_most)
    try:
        text = next(search)
        while True:
            text = search.send(count_tokens(text))
    except StopIteration as done:
        return _finish(target_tokens, seed, key, depth, done.value)


async def abuild_passkey_prompt(target_tokens: int, count_tokens: Callable[[str], Awaitable[int]], *,
                                seed: int = 0, depth: float | None = None, tolerance: float = 0.01,
                                at_most: bool = False) -> PasskeyPrompt:
    """:func:`build_passkey_prompt` with an async token counter (e.g. an engine's /tokenize)."""
    _check_args(target_tokens, depth, tolerance)
    key, depth = draw(seed, depth)
    search = _search(target_tokens, key, depth, tolerance, at_most)
    try:
        text = next(search)
        while True:
            text = search.send(await count_tokens(text))
    except StopIteration as done:
        return _finish(target_tokens, seed, key, depth, done.value)
