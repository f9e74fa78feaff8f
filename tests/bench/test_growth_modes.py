"""bench/growth_modes.py's workload: every prompt starts with the shared system prompt; boundary requests
fit L with their prompt but not with their new tokens (reserve: factor 2 from the start; recompute and
rerotate: factor 1 and grown once, unless their 512-token look-ahead already crosses L; recompute@0: factor
1, always grown), short ones stay at 1 under every mode."""

from __future__ import annotations

import argparse

from bench.growth_modes import L, MODES, with_factors, workload


def test_boundary_requests_cross_l_while_generating_and_short_ones_never_do() -> None:
    args = argparse.Namespace(system=1000, short=12, boundary=6, new_tokens=512, short_new_tokens=128, seed=0)
    tokens = list(range(100_000))
    plan = with_factors(workload(tokens, args))
    assert sum(p["kind"] == "boundary" for p in plan) == 6 and len(plan) == 18
    for p in plan:
        assert len(p["prompt"]) == p["prompt_len"] and p["prompt"][:1000] == tokens[:1000]
        starts = tuple(p[f"{m}_start"] for m in MODES)
        if p["kind"] == "boundary":
            assert p["prompt_len"] <= L < p["prompt_len"] + p["new_tokens"]
            ahead = 2.0 if p["prompt_len"] + 512 > L else 1.0
            assert starts == (ahead, 1.0, 2.0, ahead)  # recompute, recompute@0, reserve, rerotate
        else:
            assert p["prompt_len"] + p["new_tokens"] <= L
            assert starts == (1.0, 1.0, 1.0, 1.0)


def test_a_mode_names_its_look_ahead_and_an_unknown_one_fails_before_any_engine() -> None:
    import pytest

    from bench.growth_modes import overrides, parse_mode, scaling_for
    from rope_ext import RopeScaling

    assert parse_mode("recompute@0") == ("recompute", 0) and parse_mode("reserve") == ("reserve", None)
    for mode in MODES:  # the engine reads back the mode the bench planned its requests with
        params = overrides(mode)["rope_parameters"]
        assert RopeScaling.from_rope_parameters(params) == scaling_for(mode)
    assert overrides("recompute@0")["rope_parameters"]["generation_reserve"] == 0
    with pytest.raises(Exception, match="growth"):
        with_factors([{"prompt_len": 10, "new_tokens": 1}], ["grow"])
