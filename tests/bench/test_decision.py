"""The evidence issue's rule (bench/evals/decision.py) on small hand-made tables: a candidate with a missing
cell or one worse than the baseline beyond the intervals does not qualify; of the qualifiers the one at
least as good on both means wins; where the means disagree, perplexity decides."""

from __future__ import annotations

from bench.evals import decision, scoring

L = 1024


def passkey(method, length, passed, cells=10, variant="paper"):
    low, high = scoring.wilson_interval(passed, cells)
    return {"method": method, "variant": variant, "length": length, "cells": cells, "passed": passed,
            "low": low, "high": high}


def ppl(method, length, mean, sd=0.5, documents=6):
    return {"method": method, "length": length, "documents": documents, "ppl": mean, "ppl_sd": sd}


BASE = [passkey("x8", 2048, 5), passkey("x8", 4096, 5), passkey("x8", 512, 10)]
BASE_PPL = [ppl("x8", 2048, 30.0), ppl("x8", 4096, 32.0)]


def run(accuracy, perplexity, candidates):
    return decision.decide(BASE + accuracy, BASE_PPL + perplexity, candidates=candidates,
                           original_max_position=L, baseline="x8")


def test_the_better_on_both_means_is_chosen_and_cells_at_or_below_l_do_not_count():
    result = run([passkey("a", 2048, 6), passkey("a", 4096, 5), passkey("b", 2048, 6), passkey("b", 4096, 5)],
                 [ppl("a", 2048, 25.0), ppl("a", 4096, 27.0), ppl("b", 2048, 25.0), ppl("b", 4096, 26.0)],
                 ["a", "b"])
    assert [s.qualifies for s in result.standings] == [True, True]
    assert result.standings[0].passkey == 0.55 and result.standings[1].perplexity == 25.5
    assert result.choice == "b" and "better on one" in result.reason


def test_worse_beyond_the_intervals_or_incomplete_does_not_qualify():
    result = run([passkey("a", 2048, 0, cells=20), passkey("a", 4096, 5), passkey("b", 2048, 5),
                  passkey("b", 4096, 5, cells=9), passkey("c", 2048, 5), passkey("c", 4096, 5)],
                 [ppl("a", 2048, 25.0), ppl("a", 4096, 27.0), ppl("b", 2048, 25.0), ppl("b", 4096, 26.0),
                  ppl("c", 2048, 31.0), ppl("c", 4096, 32.9)],
                 ["a", "b", "c"])
    a, b, c = result.standings
    assert a.worse == ["passkey paper 2k"]  # its interval lies wholly below x8's
    assert b.missing == ["passkey paper 4k"] and b.worse == []  # nine trials where x8 has ten
    assert c.qualifies and c.worse == []  # 32.9 - 0.5 is not above 32 + 0.5: within the spreads
    assert result.choice == "c" and result.reason == "the only candidate that qualifies"
    worse = run([passkey("d", 2048, 5), passkey("d", 4096, 5)], [ppl("d", 2048, 31.0), ppl("d", 4096, 33.1)], ["d"])
    assert worse.standings[0].worse == ["perplexity 4k"] and worse.choice is None


def test_where_the_means_disagree_perplexity_decides():
    result = run([passkey("a", 2048, 7), passkey("a", 4096, 5), passkey("b", 2048, 6), passkey("b", 4096, 5)],
                 [ppl("a", 2048, 29.0), ppl("a", 4096, 27.0), ppl("b", 2048, 25.0), ppl("b", 4096, 26.0)],
                 ["a", "b"])
    assert result.choice == "b" and "disagree" in result.reason
    text = decision.markdown(result, {"b": "policy B"})
    assert "**Choice: policy B**" in text and "| a | yes | nowhere | 0.600 | 28.00 | yes |" in text
