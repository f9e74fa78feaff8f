"""The experiments' grids and reports without an engine: cells, keys, shared inputs, quick inside full,
and the tables and plots written from rows the fake engine produced."""

from __future__ import annotations

import dataclasses

import pytest

from bench.evals.experiments import EXPERIMENTS, GRIDS
from bench.evals.runner import run_cells
from server.passkey import MAX_NEW_TOKENS
from tests.bench.conftest import FakeEngine


@pytest.mark.parametrize("name", list(EXPERIMENTS))
@pytest.mark.parametrize("mode", ["tiny", "quick", "decide", "full"])
def test_cells_have_unique_keys_and_plan_their_length(name, mode, fake_corpus):
    if mode not in GRIDS[name]:
        pytest.skip(f"{name} has no {mode} grid")
    cells = EXPERIMENTS[name].cells(GRIDS[name][mode], fake_corpus, dtype="bfloat16", seed=0)
    keys = [tuple(sorted(c.key.items())) for c in cells]
    assert len(set(keys)) == len(keys) > 0
    for cell in cells:
        assert cell.key["length"] == cell.context
        assert cell.engine == dataclasses.replace(cell.engine)  # hashable, comparable


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_cells_are_full_cells_so_a_full_run_resumes_a_quick_one(name, fake_corpus):
    experiment = EXPERIMENTS[name]
    quick = experiment.cells(GRIDS[name]["quick"], fake_corpus, dtype="bfloat16", seed=0)
    full = experiment.cells(GRIDS[name]["full"], fake_corpus, dtype="bfloat16", seed=0)
    full_keys = {tuple(sorted(c.key.items())) for c in full}
    assert all(tuple(sorted(c.key.items())) in full_keys for c in quick)


def test_built_requests_plan_exactly_the_cell_length(fake_corpus):
    for name in EXPERIMENTS:
        for cell in EXPERIMENTS[name].cells(GRIDS[name]["tiny"], fake_corpus, dtype="bfloat16", seed=0):
            request = cell.build()
            assert len(request.prompt_token_ids) + request.max_tokens == cell.context
            assert request.max_tokens == (MAX_NEW_TOKENS if name == "passkey" else 1)


def test_reports_from_a_fake_run(tmp_path, fake_corpus):
    engine = FakeEngine()
    plans = []
    for name, experiment in EXPERIMENTS.items():
        grid = dataclasses.replace(GRIDS[name]["tiny"], methods=("unscaled", "yarn-x8", "dynamic-yarn"))
        plans.append((experiment, grid, experiment.store(tmp_path),
                      experiment.cells(grid, fake_corpus, dtype="bfloat16", seed=0)))
    run_cells([(s, c) for _, _, s, c in plans], model="m", dtype="bfloat16", engine=engine, progress=False)
    assert len(engine.calls) == 3  # plain, yarn-x8, the plugin: shared by the three experiments
    for experiment, grid, store, cells in plans:
        rows = [store.get(c.key) for c in cells]
        paths = experiment.report(rows, grid, tmp_path, "tiny")
        assert all(p.exists() and p.stat().st_size > 0 for p in paths)
        pytest.importorskip("matplotlib")
        assert any(p.suffix == ".png" for p in paths)
    passkey = (tmp_path / "passkey" / "tiny_accuracy.md").read_text()
    assert "| unscaled (plain RoPE) | 1/1 [0.21, 1.00] |" in passkey
    assert "| static YaRN x8 (stock vLLM) | 0/1 [0.00, 0.79] |" in passkey
    short = (tmp_path / "short-context" / "tiny_short_context.csv").read_text().splitlines()
    plugin_1k = next(line for line in short if line.startswith("dynamic-yarn,1024,"))
    assert plugin_1k.split(",")[4:6] == ["0.0", "1"]  # +0 % and the window identical to unscaled


def test_the_decision_grid(fake_corpus):
    """At least 10 trials per passkey cell (prose at 16k only), six documents per perplexity point, and
    cells of ropeserve policies that ask one engine for the same factor with the same prompt share one
    request: the plugin at s = 2 is one computation whichever policy chose 2."""
    from collections import Counter

    from bench.evals.runner import plan_groups

    passkey = EXPERIMENTS["passkey"].cells(GRIDS["passkey"]["decide"], fake_corpus, dtype="bfloat16", seed=0)
    trials = Counter((c.key["method"], c.key["variant"], c.key["length"]) for c in passkey)
    assert min(trials.values()) >= 10
    assert {k[2] for k in trials if k[1] == "prose"} == {16384}
    assert {k[2] for k in trials if k[1] == "paper"} == {12288, 16384, 24576}
    perplexity = EXPERIMENTS["perplexity"].cells(GRIDS["perplexity"]["decide"], fake_corpus, dtype="bfloat16",
                                                 seed=0)
    documents = Counter((c.key["method"], c.key["length"]) for c in perplexity)
    assert set(documents.values()) == {6}

    store = _NothingDone()
    groups = plan_groups([(store, passkey)])
    plugin = next(inputs for engine, inputs in groups.items() if engine.name.startswith("plugin-dynamic_yarn"))
    at_12k = [cells for (kind, variant, length, *_), cells in plugin.items() if length == 12288]
    # 12k: every policy runs at 2 (headroom: 1.25 x 12288 = 15360 <= 16384), so one request serves three cells
    assert len(at_12k) == 10 and all(len(cells) == 3 for cells in at_12k)
    at_16k = [cells for (kind, variant, length, *_), cells in plugin.items() if length == 16384]
    # 16k: plain and fine buckets at 2 (shared), headroom at 4 (its own request)
    assert sorted(len(cells) for cells in at_16k) == [1] * 20 + [2] * 20
    for cells in plugin.values():
        built = {tuple(sorted((c.build().extra_args or {}).items())) for _, c in cells}
        assert len(built) == 1  # the shared request asks for one factor


class _NothingDone:
    def done(self, key) -> bool:
        return False
