"""Pure aggregation: perplexity and digests, passkey accuracy and grids, the perplexity and short-context
tables, Markdown."""

from __future__ import annotations

import math

import pytest

from bench.evals import scoring


def test_perplexity_values():
    values = scoring.perplexity_values([-1.0, -2.0, -3.0])
    assert values["scored_tokens"] == 3
    assert values["nll_sum"] == 6.0
    assert values["ppl"] == pytest.approx(math.exp(2.0))
    assert values["logprobs_sha1"] == scoring.logprob_digest([-1.0, -2.0, -3.0])
    assert values["logprobs_sha1"] != scoring.logprob_digest([-1.0, -2.0, -3.0000000000000004])
    with pytest.raises(ValueError):
        scoring.perplexity_values([])


def passkey_row(method, length, depth, seed, passed, variant="paper"):
    return {"method": method, "variant": variant, "length": str(length), "depth": str(depth),
            "seed": str(seed), "passed": str(passed)}


ROWS = [passkey_row("b", 8192, 0.2, 0, True), passkey_row("b", 8192, 0.2, 1, False),
        passkey_row("b", 4096, 0.8, 0, True), passkey_row("a", 4096, 0.2, 0, False),
        passkey_row("a", 4096, 0.2, 0, True, variant="prose")]


def test_passkey_accuracy_keeps_the_method_order_and_sorts_lengths():
    table = scoring.passkey_accuracy(ROWS, methods=["b", "a"])
    assert [(r["method"], r["variant"], r["length"], r["passed"], r["cells"]) for r in table] == [
        ("b", "paper", 4096, 1, 1), ("b", "paper", 8192, 1, 2), ("a", "paper", 4096, 0, 1), ("a", "prose", 4096, 1, 1)]
    assert table[1]["accuracy"] == 0.5


def test_passkey_grid_averages_seeds_and_marks_missing_cells():
    lengths, depths, grid = scoring.passkey_grid(ROWS, "b", "paper")
    assert lengths == [4096, 8192] and depths == [0.2, 0.8]
    assert grid == [[None, 1.0], [0.5, None]]


def test_perplexity_table_is_the_mean_of_per_document_perplexities():
    rows = [{"method": "m", "book": "x", "length": "1024", "ppl": "10.0"},
            {"method": "m", "book": "y", "length": "1024", "ppl": "20.0"},
            {"method": "m", "book": "x", "length": "2048", "ppl": "8.0"}]
    table = scoring.perplexity_table(rows)
    assert table[0] == {"method": "m", "length": 1024, "documents": 2, "ppl_x": 10.0, "ppl_y": 20.0, "ppl": 15.0,
                        "ppl_sd": pytest.approx(7.0710678), "ppl_min": 10.0, "ppl_max": 20.0, "shared": 0}
    assert table[1]["ppl"] == 8.0 and table[1]["documents"] == 1 and table[1]["ppl_sd"] is None
    assert [scoring.perplexity_shown(row) for row in table] == ["15.00 ± 7.07 (2)", "8.00 (1)"]


def test_perplexity_documents_are_books_from_each_offset():
    rows = [{"method": "m", "book": b, "offset": o, "length": "1024", "ppl": str(p)}
            for b, o, p in (("x", "0", 10.0), ("x", "500", 14.0), ("y", "0", 30.0))]
    (row,) = scoring.perplexity_table(rows)
    assert row["documents"] == 3 and row["ppl_x"] == 12.0 and row["ppl_y"] == 30.0
    assert row["ppl"] == 18.0 and row["ppl_min"] == 10.0 and row["ppl_max"] == 30.0


@pytest.mark.parametrize(("passed", "trials", "low", "high"), [
    # Reference values: Wilson score interval, z = 1.96 (e.g. statsmodels proportion_confint(method="wilson"))
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (1, 2, 0.0945, 0.9055),
    (0, 0, 0.0, 1.0),
])
def test_wilson_interval(passed, trials, low, high):
    assert scoring.wilson_interval(passed, trials) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_tables_say_which_cells_are_shared():
    rows = [{**r, "shared_from": "a" if r["method"] == "b" and r["length"] == "8192" else ""} for r in ROWS]
    table = scoring.passkey_accuracy(rows, methods=["b", "a"])
    assert [(r["length"], r["shared"]) for r in table[:2]] == [(4096, 0), (8192, 2)]
    assert scoring.passkey_shown(table[1]) == "1/2 [0.09, 0.91] shared"
    assert scoring.passkey_shown(table[0]).endswith("]")
    ppl = scoring.perplexity_table([{"method": "m", "book": "x", "offset": o, "length": "1024", "ppl": "9.0",
                                     "shared_from": "n" if o == "0" else ""} for o in ("0", "500")])
    assert scoring.perplexity_shown(ppl[0]) == "9.00 ± 0.00 (2) (1 shared)"


def test_passkey_accuracy_carries_its_interval():
    table = scoring.passkey_accuracy(ROWS, methods=["b", "a"])
    assert (table[1]["low"], table[1]["high"]) == scoring.wilson_interval(1, 2)


def window(method, length, w, ppl, digest):
    return {"method": method, "book": "x", "length": str(length), "window": str(w), "ppl": str(ppl),
            "logprobs_sha1": digest}


def test_short_context_table_compares_with_the_unscaled_model_window_by_window():
    rows = [window("unscaled", 1024, 0, 10.0, "a"), window("unscaled", 1024, 1, 20.0, "b"),
            window("plugin", 1024, 0, 10.0, "a"), window("plugin", 1024, 1, 20.0, "b"),
            window("yarn", 1024, 0, 11.0, "c"), window("yarn", 1024, 1, 22.0, "d"),
            window("yarn", 2048, 0, 9.0, "e")]
    table = {(r["method"], r["length"]): r for r in scoring.short_context_table(rows, ["unscaled", "plugin", "yarn"])}
    assert table[("plugin", 1024)]["delta_pct"] == 0.0 and table[("plugin", 1024)]["identical"] == 2
    assert table[("yarn", 1024)]["delta_pct"] == pytest.approx(10.0)
    assert table[("yarn", 1024)]["identical"] == 0 and table[("yarn", 1024)]["max_abs_delta_ppl"] == 2.0
    assert table[("yarn", 2048)]["delta_pct"] is None  # no baseline at that length
    assert table[("unscaled", 1024)]["identical"] == 2


def test_markdown_and_pivot():
    rows = [{"m": "a", "n": 1024, "v": 1.234}, {"m": "a", "n": 2048, "v": 2.0}, {"m": "b", "n": 1024, "v": None}]
    text = scoring.pivot_markdown(rows, "m", "n", "v", fmt=".1f", labels={"a": "A"}, column_label=lambda n: f"{n}t")
    assert text.splitlines() == ["| m | 1024t | 2048t |", "|---|---|---|", "| A | 1.2 | 2.0 |", "| b | – | – |"]
    partial = [{"m": "a", "n": 1024, "v": 1.0}, {"m": "b", "n": 1024}]  # b not yet measured
    assert scoring.pivot_markdown(partial, "m", "n", "v", fmt=".1f").splitlines()[-1] == "| b | – |"
