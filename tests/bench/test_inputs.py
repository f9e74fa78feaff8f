"""Evaluation inputs: Gutenberg bodies, truncated documents and windows, scored logprobs, passkey prompts
(exact planned length, seeded, the needle where the depth says)."""

from __future__ import annotations

import pytest

from bench.evals import inputs
from bench.evals.inputs import (
    book_body,
    passkey_prompt,
    scored,
    truncated_document,
    window_count,
    windows,
)
from server.passkey import MAX_NEW_TOKENS, draw, info_line, parse_answer


def test_book_body_is_between_the_gutenberg_markers():
    text = "header\n*** START OF THIS BOOK ***\n\nChapter 1\nText.\n*** END OF THIS BOOK ***\nlicence"
    assert book_body(text) == "Chapter 1\nText."
    assert book_body("  no markers \n") == "no markers"


def test_both_books_are_found_and_long_enough():
    for name in inputs.BOOKS:
        body = inputs.read_book(name)
        assert len(body) > 300_000 and "PROJECT GUTENBERG" not in body[:200]


def test_truncated_document_plans_exactly_the_length():
    doc = truncated_document(range(100, 200), 10, bos=1)
    assert doc == [1, *range(100, 108)]
    assert len(doc) + inputs.PERPLEXITY_NEW_TOKENS == 10
    with pytest.raises(ValueError):
        truncated_document(range(5), 10, bos=1)


def test_windows_are_contiguous_and_do_not_overlap():
    tokens = list(range(1000))
    got = windows(tokens, 12, 3, offset=100, bos=1)
    assert got == [[1, *range(100, 110)], [1, *range(110, 120)], [1, *range(120, 130)]]
    with pytest.raises(ValueError):
        windows(tokens, 12, 100, offset=100, bos=1)


def test_window_count_follows_the_budget_and_what_fits():
    assert window_count(1024, 8192, 100_000, 2000) == 8
    assert window_count(8192, 8192, 100_000, 2000) == 1
    assert window_count(8192, 4096, 100_000, 2000) == 1  # at least one
    assert window_count(1024, 1 << 30, 12_000, 2000) == 9  # (12000 - 2000) // 1022


def test_scored_drops_the_first_token_only():
    assert scored([None, -1.0, -2.0]) == [-1.0, -2.0]
    with pytest.raises(ValueError):
        scored([-1.0, -2.0])
    with pytest.raises(ValueError):
        scored([None, None])


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def book(name: str) -> list[int]:
    return list(range(1000, 101000))


@pytest.mark.parametrize("variant", ["paper", "prose"])
@pytest.mark.parametrize("length", [300, 2048])
def test_passkey_prompts_plan_exactly_the_length(variant, length):
    ids, key = passkey_prompt(variant, length, 0.5, 7, chars, book)
    assert len(ids) + MAX_NEW_TOKENS == length
    assert key == draw(7, 0.5)[0]
    assert info_line(key) in "".join(map(chr, ids))


@pytest.mark.parametrize("variant", ["paper", "prose"])
def test_passkey_prompts_are_seeded(variant):
    assert passkey_prompt(variant, 1024, 0.3, 1, chars, book) == passkey_prompt(variant, 1024, 0.3, 1, chars, book)
    assert passkey_prompt(variant, 1024, 0.3, 1, chars, book) != passkey_prompt(variant, 1024, 0.3, 2, chars, book)


def test_the_prose_needle_sits_at_its_depth_inside_book_tokens():
    ids, key = passkey_prompt("prose", 4096, 0.25, 3, chars, book)
    needle = chars("\n" + info_line(key) + "\n")
    at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
    hay_before = [t for t in ids[:at] if t >= 1000]
    hay_after = [t for t in ids[at + len(needle):] if t >= 1000]
    assert hay_before + hay_after == list(range(hay_before[0], hay_before[0] + len(hay_before) + len(hay_after)))
    assert len(hay_before) == round(0.25 * (len(hay_before) + len(hay_after)))
    assert parse_answer(f" {key}.") == key


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="known"):
        passkey_prompt("haiku", 1024, 0.5, 0, chars, book)


def test_the_real_tokenizer_gives_the_exact_length_at_l(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    ids, _ = passkey_prompt("paper", 8192, 0.5, 0, encode, book)
    assert len(ids) == 8192 - MAX_NEW_TOKENS
    assert encode(tokenizer.decode(ids)) == ids
