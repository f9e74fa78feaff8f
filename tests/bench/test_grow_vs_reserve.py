"""bench/grow_vs_reserve.py's workload: boundary requests fit L with their prompt but not with their new
tokens (reserve: factor 2 from the start; grow: factor 1, re-rotated once), short ones stay at 1 either way."""

from __future__ import annotations

import argparse

from bench.grow_vs_reserve import L, with_factors, workload


def test_boundary_requests_cross_l_while_generating_and_short_ones_never_do() -> None:
    args = argparse.Namespace(short=12, boundary=6, new_tokens=512, short_new_tokens=128, seed=0)
    plan = with_factors(workload(list(range(100_000)), args))
    assert sum(p["kind"] == "boundary" for p in plan) == 6 and len(plan) == 18
    for p in plan:
        assert len(p["prompt"]) == p["prompt_len"]
        if p["kind"] == "boundary":
            assert p["prompt_len"] <= L < p["prompt_len"] + p["new_tokens"]
            assert (p["reserve_factor"], p["grow_start_factor"]) == (2.0, 1.0)
        else:
            assert p["prompt_len"] + p["new_tokens"] <= L
            assert (p["reserve_factor"], p["grow_start_factor"]) == (1.0, 1.0)
