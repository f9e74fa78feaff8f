"""The runner, with a fake engine: one engine call per configuration, shared requests, rows stored,
nothing recomputed on a second run, failures retried and left pending."""

from __future__ import annotations

from bench.evals import methods
from bench.evals.runner import Cell, chunked, plan_groups, run_cells, shared_rows
from bench.evals.store import CellStore
from server.offline import Request
from tests.bench.conftest import FakeEngine


def make_cells(method_names, lengths) -> list[Cell]:
    cells = []
    for name in method_names:
        method = methods.METHODS[name]
        for n in lengths:
            cells.append(Cell(
                key={"method": name, "length": n}, engine=method.engine_for(n), input_id=("doc", n), context=n,
                build=lambda n=n: Request(prompt_token_ids=[1] * (n - 1), max_tokens=1, prompt_logprobs=0),
                finish=lambda result: {"tokens": result.num_prompt_tokens}))
    return cells


def store(tmp_path) -> CellStore:
    return CellStore(tmp_path / "cells.csv", ("method", "length"), ("tokens",))


def test_cells_with_the_same_input_and_engine_share_a_request(tmp_path):
    groups = plan_groups([(store(tmp_path), make_cells(["unscaled", "yarn-fit", "yarn-x8"], [4096, 16384]))])
    assert [e.name for e in groups] == ["plain", "plain-64k", "yarn-x2", "yarn-x8"]
    plain = groups[methods.plain()]
    assert list(plain) == [("doc", 4096)]
    assert [c.key["method"] for _, c in plain[("doc", 4096)]] == ["unscaled", "yarn-fit"]
    assert [c.key["method"] for _, c in groups[methods.plain_long()][("doc", 16384)]] == ["unscaled"]
    assert list(groups[methods.static_yarn(8)]) == [("doc", 4096), ("doc", 16384)]  # shortest first


def test_chunks_respect_the_token_budget():
    items = [(("doc", n), [(None, Cell({}, methods.plain(), ("doc", n), n, None, None))]) for n in (100, 200, 300, 50)]
    assert [[i[0][1] for i in chunk] for chunk in chunked(items, 300)] == [[100, 200], [300], [50]]
    assert len(chunked(items, 10)) == 4  # a chunk holds at least one request


def test_run_stores_every_cell_and_a_second_run_computes_nothing(tmp_path):
    engine = FakeEngine()
    cells = make_cells(["unscaled", "yarn-fit", "dynamic-yarn"], [1024, 8192, 9000])
    report = run_cells([(store(tmp_path), cells)], model="m", dtype="bfloat16", engine=engine, progress=False)
    assert report.computed == len(cells) == 9 and not report.failed
    assert sorted(spec.hf_overrides is None for spec, _ in engine.calls) == [False, False, False, True]
    assert all(len(batch) == 1 for _, batches in engine.calls for batch in batches)  # each request alone
    plain_spec = next(spec for spec, _ in engine.calls if spec.hf_overrides is None)
    assert plain_spec.max_model_len == 8192 and methods.LONG_ENV not in plain_spec.env
    again = store(tmp_path)
    assert len(again) == 9 and again.get({"method": "yarn-fit", "length": 1024})["tokens"] == "1023"
    engine.calls.clear()
    report = run_cells([(again, cells)], model="m", dtype="bfloat16", engine=engine, progress=False)
    assert report.computed == 0 and report.already_done == 9 and engine.calls == []


def test_a_failed_engine_is_retried_then_left_pending(tmp_path):
    cells = make_cells(["unscaled", "yarn-x8"], [1024])
    report = run_cells([(store(tmp_path), cells)], model="m", dtype="bfloat16", engine=FakeEngine(fail_times=1),
                       progress=False, log=lambda _: None)
    assert report.computed == 2 and len(report.failed) == 1  # the first attempt failed, the retry worked
    always = FakeEngine(fail_times=10)
    s = CellStore(tmp_path / "other.csv", ("method", "length"), ("tokens",))
    report = run_cells([(s, cells)], model="m", dtype="bfloat16", engine=always, retries=1, progress=False,
                       log=lambda _: None)
    assert report.computed == 0 and len(always.calls) == 4 and len(s) == 0


def test_extra_environment_reaches_every_engine(tmp_path):
    engine = FakeEngine()
    run_cells([(store(tmp_path), make_cells(["unscaled", "yarn-x8"], [1024]))], model="m", dtype="bfloat16",
              engine=engine, progress=False, env={"VLLM_CPU_OMP_THREADS_BIND": "1"})
    assert [spec.env["VLLM_CPU_OMP_THREADS_BIND"] for spec, _ in engine.calls] == ["1", "1"]
    assert all(spec.env["VLLM_CPU_ATTN_SPLIT_KV"] == "0" for spec, _ in engine.calls)


def test_a_pending_cell_that_is_a_stored_computation_is_shared_not_recomputed(tmp_path):
    s = CellStore(tmp_path / "cells.csv", ("method", "length"), ("engine", "tokens", "shared_from"))
    engine = methods.static_yarn(8)

    def cell(method, n, input_id=None):
        return Cell({"method": method, "length": n}, engine, input_id or ("doc", n), n, None, None)

    s.add([{"method": "a", "length": 4096, "engine": engine.name, "tokens": 7, "shared_from": ""},
           {"method": "a", "length": 8192, "engine": "an-older-engine", "tokens": 9, "shared_from": ""}])
    donors = [cell("a", 4096), cell("a", 8192)]
    pending = [cell("b", 4096), cell("b", 8192), cell("c", 4096, ("another prompt",))]
    ((store_, rows),) = shared_rows([(s, pending)], [(s, donors)])
    assert store_ is s and rows == [{"method": "b", "length": 4096, "engine": engine.name, "tokens": "7",
                                     "shared_from": "a"}]  # not a row another engine computed, nor another input
    s.add(rows)
    assert s.done({"method": "b", "length": 4096}) and plan_groups([(s, pending[:1])]) == {}
    ((_, again),) = shared_rows([(s, pending)], [(s, donors + pending[:1])])
    assert again == []  # done, and a shared row is never a source
