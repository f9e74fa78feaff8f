"""A tiny run of the three experiments on the real engine (the default model, bf16, CPU): two engines
(plain RoPE and the plugin) shared by the experiments, a few cells each at 512 and 1024 tokens.

Checks the scripts end to end (cells stored, tables, Markdown and plots written, the run logged, nothing
recomputed on a second run) and one real property: at or below L the plugin computes exactly what the
unscaled model computes, logprob for logprob (the same digest) and token for token. Every request runs
alone, so bf16 comparisons are exact. About two minutes on two cores.
"""

from __future__ import annotations

import csv
import json

import pytest

from bench.evals import cli

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def read(path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def out(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    assert cli.main(["--tiny", "--out", str(folder), "--model", model_dir, "--no-progress"]) == 0
    return folder


def by_method(rows, *fields):
    return {(r["method"], *(r[f] for f in fields)): r for r in rows}


def test_every_cell_is_stored_and_reported(out):
    assert len(read(out / "passkey" / "cells.csv")) == 4  # 2 methods x 2 haystacks x 512 tokens
    assert len(read(out / "perplexity" / "cells.csv")) == 4  # 2 methods x (512, 1024)
    assert len(read(out / "short-context" / "cells.csv")) == 6  # 2 methods x (2 windows of 512, 1 of 1024)
    for name, files in {"passkey": ["tiny_accuracy.csv", "tiny_accuracy.md"],
                        "perplexity": ["tiny_perplexity.csv", "tiny_perplexity.md"],
                        "short-context": ["tiny_short_context.csv", "tiny_short_context.md"]}.items():
        for file in files:
            assert (out / name / file).stat().st_size > 0
        log = [json.loads(line) for line in (out / name / "runs.jsonl").read_text().splitlines()]
        assert log[-1]["computed_cells"] == 14 and log[-1]["missing_cells"] == 0
        assert {r["engine"] for r in log[-1]["engine_runs"]} == {
            "plain", "plugin-dynamic_yarn-x8-buckets1-1.41-2-2.83-4-5.66-8"}
    pytest.importorskip("matplotlib")
    assert (out / "perplexity" / "tiny_perplexity.png").stat().st_size > 0


def test_the_plugin_equals_the_unscaled_model_at_or_below_l(out):
    for name, fields in {"perplexity": ("length",), "short-context": ("length", "window")}.items():
        rows = by_method(read(out / name / "cells.csv"), *fields)
        for (method, *rest), row in rows.items():
            if method == "dynamic-yarn":
                unscaled = rows[("unscaled", *rest)]
                assert row["scale"] == "1.0"
                assert row["logprobs_sha1"] == unscaled["logprobs_sha1"]
                assert row["ppl"] == unscaled["ppl"]
                assert 5 < float(row["ppl"]) < 200
    passkey = by_method(read(out / "passkey" / "cells.csv"), "variant")
    for variant in ("paper", "prose"):
        assert passkey[("dynamic-yarn", variant)]["output"] == passkey[("unscaled", variant)]["output"]
        assert passkey[("unscaled", variant)]["prompt_tokens"] == "502"


def test_a_second_run_recomputes_nothing(out, model_dir, capsys):
    before = (out / "perplexity" / "cells.csv").read_text()
    assert cli.main(["--tiny", "--out", str(out), "--model", model_dir, "--no-progress"]) == 0
    assert "0 requests pending" in capsys.readouterr().out
    assert (out / "perplexity" / "cells.csv").read_text() == before
