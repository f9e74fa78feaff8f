"""The passkey prompt builder: the paper's prompt, to a target token count, seeded and tokenizer-agnostic."""

from __future__ import annotations

import re

import anyio
import pytest

from server.passkey import (
    FILLER,
    KEY_RANGE,
    QUESTION,
    TASK,
    PasskeyBuildError,
    abuild_passkey_prompt,
    build_passkey_prompt,
    info_line,
    parse_answer,
    render,
)


def whitespace(text: str) -> int:
    return len(text.split())


def words_and_punctuation(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def subwords(text: str) -> int:
    """Words split into 3-character pieces: counts move by more than one token as the haystack grows."""
    return sum(-(-len(word) // 3) for word in re.findall(r"\w+|[^\w\s]", text))


def byte_level(text: str) -> int:
    return len(text.encode())


COUNTERS = [whitespace, words_and_punctuation, subwords, byte_level]


@pytest.mark.parametrize("count", COUNTERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("target", [300, 357, 1000, 4096, 8192, 65520])
def test_prompt_has_the_target_tokens_within_one_percent(count, target: int) -> None:
    prompt = build_passkey_prompt(target, count, seed=7)
    assert abs(count(prompt.text) - target) <= 0.01 * target
    assert prompt.tokens == count(prompt.text) and prompt.target_tokens == target


@pytest.mark.parametrize("count", [whitespace, words_and_punctuation], ids=lambda c: c.__name__)
@pytest.mark.parametrize("target", [70, 80, 99, 333])
def test_short_prompts_are_exact(count, target: int) -> None:
    # 1 % of fewer than 100 tokens is no token at all: the search must land exactly
    for seed in range(10):
        prompt = build_passkey_prompt(target, count, seed=seed)
        assert abs(prompt.tokens - target) <= target // 100, seed


def test_prompt_is_the_papers() -> None:
    prompt = build_passkey_prompt(500, words_and_punctuation, seed=3)
    lines = prompt.text.split("\n")
    assert lines[0] == TASK and lines[2] == info_line(prompt.key) and lines[4] == QUESTION
    haystack = lines[1] + lines[3]
    assert len(haystack) == prompt.haystack_chars
    assert ((FILLER + " ") * (len(haystack) // len(FILLER) + 1)).startswith(haystack)
    assert haystack.startswith(FILLER)
    cut = round(prompt.depth * prompt.haystack_chars)
    assert cut - len(FILLER) < len(lines[1]) <= cut  # moved back to the start of a word at most
    assert lines[1] == "" or lines[1].endswith(" ")
    assert KEY_RANGE[0] <= prompt.key <= KEY_RANGE[1]


def test_seeded_and_deterministic() -> None:
    a = build_passkey_prompt(1000, whitespace, seed=11)
    b = build_passkey_prompt(1000, whitespace, seed=11)
    c = build_passkey_prompt(1000, whitespace, seed=12)
    assert a == b
    assert (a.key, a.depth) != (c.key, c.depth)


def test_depth_places_the_key() -> None:
    shallow = build_passkey_prompt(2000, whitespace, seed=5, depth=0.0)
    deep = build_passkey_prompt(2000, whitespace, seed=5, depth=1.0)
    middle = build_passkey_prompt(2000, whitespace, seed=5, depth=0.5)
    assert shallow.key == deep.key == middle.key  # the key does not depend on the depth
    position = lambda p: p.text.index(info_line(p.key)) / len(p.text)  # noqa: E731
    assert position(shallow) < 0.05 < 0.4 < position(middle) < 0.6 < 0.95 < position(deep)


def test_does_not_touch_global_random_state() -> None:
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    build_passkey_prompt(300, whitespace, seed=9)
    assert random.random() == expected


def test_too_small_target_is_an_error() -> None:
    base = whitespace(render(1, 0.5, 0))
    with pytest.raises(PasskeyBuildError, match=f"at least {base} tokens"):
        build_passkey_prompt(base - 5, whitespace)


@pytest.mark.parametrize("bad", [dict(target_tokens=0), dict(target_tokens=1.5), dict(depth=1.5),
                                 dict(depth=-0.1), dict(tolerance=1.0)])
def test_bad_arguments(bad: dict) -> None:
    kwargs = {"target_tokens": 500, **bad}
    with pytest.raises(PasskeyBuildError):
        build_passkey_prompt(count_tokens=whitespace, **kwargs)


def test_unreachable_count_is_an_error() -> None:
    # a counter that jumps by 50 tokens per character can never land within 1 % of 1000
    with pytest.raises(PasskeyBuildError, match="could not build"):
        build_passkey_prompt(1001, lambda text: 50 * (len(text) // 50) // 1, seed=0, tolerance=0.0)


def test_async_builder_matches_the_sync_one() -> None:
    calls = []

    async def count(text: str) -> int:
        calls.append(len(text))
        await anyio.sleep(0)
        return subwords(text)

    async_prompt = anyio.run(lambda: abuild_passkey_prompt(3000, count, seed=4, depth=0.25))
    assert async_prompt == build_passkey_prompt(3000, subwords, seed=4, depth=0.25)
    assert len(calls) <= 12  # a few token counts, not a scan


@pytest.mark.parametrize("text,expected", [(" 12345. Remember it", 12345), ("12", 12), (" the key is 7 or 8", 7),
                                           ("no digits", None), ("", None)])
def test_parse_answer(text: str, expected: int | None) -> None:
    assert parse_answer(text) == expected
