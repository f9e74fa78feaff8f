"""The plugin's math on an accelerator, with torch alone: for a GPU machine with CUDA and PyTorch but no vLLM.

What runs on the device in the engine is torch code around vLLM's kernels; this checks the parts that
are the plugin's, each against a float64 reference computed on the CPU, with the project tree and torch
only (no vLLM, no network, nothing to install):

1. ``tables``: the stacked bucket tables (``rope_ext.build_bucket_tables``) built on the device against
   the float64 reference of each bucket's frequencies (the same rows computed in float64).
2. ``lookup``: the per-token row offset (position + bucket row offset, as ``PerRequestRotaryEmbedding``
   adds it) gathering rows of the stacked table for a flat batch mixing scales 1, 2 and 8, then rotating
   queries as the plain-torch path does (``rope_ext.rerotate.rotate_keys``), against the float64 rotation
   at each token's own scale; in eager mode, under ``torch.compile``, and under CUDA-graph capture and
   replay with the offsets buffer rewritten in place between replays (three different mixes of scales
   through one captured graph: a graph that kept a stale offsets tensor would rotate at the old scales).
3. ``rerotate``: the re-rotation fast path (``rope_ext.rerotate.rerotate``) against its float64
   reference, from bucket 2 to bucket 8, fp32 and bf16.

One line per check is printed as it runs, and the JSON (``--out``) is rewritten after each stage, so a run
cut short keeps what it did. It takes well under two minutes; ``make test`` runs it on the CPU (the CUDA
graph stage is then reported as skipped)::

    python3 bench/device_check.py --device cuda --out "$OUT/device_check.json"     # on the GPU machine
    python3 bench/device_check.py --device cpu

Exit status 1 when any check fails. The full engine check, for a machine with vLLM, is
``bench/cuda_plugin_check.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rope_ext import RopeScaling, RotaryConfig, bucket_frequencies, build_bucket_tables  # noqa: E402
from rope_ext.rerotate import delta_table, rerotate, rerotate_reference, rotate_keys  # noqa: E402

L, MAX_FACTOR, HEAD, BASE, HEADS = 1024, 8.0, 128, 10000.0, 4
SCALING = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=MAX_FACTOR)
ROTARY = RotaryConfig(HEAD, BASE)
# Tolerances against the float64 reference (max |difference| on unit-scale values).
TABLE_TOL = 1e-6  # float32 cos/sin of the same float32 angles (measured on CPU: 1e-7)
ROTATE_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # measured on CPU: 7e-7, 1.6e-2


def reference_rows(factor: float, positions: torch.Tensor) -> torch.Tensor:
    """float64 rows of bucket ``factor`` at ``positions`` (angles from float32 products, as tables do)."""
    inv_freq, attention = bucket_frequencies(ROTARY, SCALING, factor)
    angles = (positions.to(torch.float32)[:, None] * inv_freq[None, :]).to(torch.float64)
    return torch.cat((angles.cos(), angles.sin()), dim=-1) * attention


class Report:
    def __init__(self, out: Path | None, device: str) -> None:
        self.out = out
        self.data: dict = {"device": device, "torch": torch.__version__, "checks": [], "stages": []}
        if device.startswith("cuda"):
            self.data["gpu"] = torch.cuda.get_device_name(0)

    def check(self, stage: str, name: str, value: float, tolerance: float) -> bool:
        passed = bool(value <= tolerance)
        self.data["checks"].append({"stage": stage, "check": name, "max_abs_diff": value, "tolerance": tolerance,
                                    "passed": passed})
        print(f"{'ok  ' if passed else 'FAIL'} {stage:9} {name:58} {value:.3e} (tolerance {tolerance:.1e})",
              flush=True)
        return passed

    def skip(self, stage: str, reason: str) -> None:
        self.data["checks"].append({"stage": stage, "skipped": reason})
        print(f"skip {stage:9} {reason}", flush=True)

    def stage_done(self, stage: str, seconds: float) -> None:
        self.data["stages"].append({"stage": stage, "seconds": round(seconds, 3)})
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.data, indent=2))

    @property
    def failed(self) -> int:
        return sum(1 for c in self.data["checks"] if c.get("passed") is False)


def check_tables(report: Report, device: str) -> None:
    with torch.device(device):
        tables = build_bucket_tables(ROTARY, SCALING)
    positions = torch.arange(SCALING.max_context)
    worst = 0.0
    for factor in SCALING.buckets:
        rows = tables.cos_sin_cache[tables.row_offset(factor):][:SCALING.max_context].cpu().to(torch.float64)
        worst = max(worst, float((rows - reference_rows(factor, positions)).abs().max()))
    report.check("tables", f"{len(SCALING.buckets)} buckets x {SCALING.max_context} rows, float32", worst, TABLE_TOL)


def _batch(seed: int):
    """A flat batch of three requests at scales drawn from the buckets: (positions, factors, float64 so a
    bucket such as sqrt(2) stays itself)."""
    g = torch.Generator().manual_seed(seed)
    factors = [SCALING.buckets[i] for i in torch.randint(0, len(SCALING.buckets), (3,), generator=g).tolist()]
    parts = [torch.arange(int(s), int(s) + n) for s, n in zip(torch.randint(0, 4000, (3,), generator=g), (70, 40, 18))]
    positions = torch.cat(parts)
    per_token = torch.cat([torch.full((p.numel(),), f, dtype=torch.float64) for p, f in zip(parts, factors)])
    return positions, per_token


def _reference_rotation(query: torch.Tensor, positions: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    rows = torch.empty(positions.numel(), HEAD, dtype=torch.float64)
    for factor in per_token.unique().tolist():
        where = per_token == factor
        rows[where] = reference_rows(factor, positions[where])
    return rotate_keys(query.cpu().to(torch.float64), rows, head_size=HEAD, is_neox=True)


def check_lookup(report: Report, device: str) -> None:
    with torch.device(device):
        tables = build_bucket_tables(ROTARY, SCALING)
    table = tables.cos_sin_cache
    num_tokens = 128
    offsets = torch.zeros(4096, dtype=torch.long, device=device)  # the module's persistent buffer

    def step(positions: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        rows = table.index_select(0, positions + offsets[: positions.shape[-1]])
        return rotate_keys(query, rows, head_size=HEAD, is_neox=True)

    def load(seed: int, dtype: torch.dtype):
        positions, per_token = _batch(seed)
        offsets[:num_tokens].copy_(torch.tensor([tables.row_offset(f) for f in per_token.tolist()]))
        query = torch.randn(num_tokens, HEADS * HEAD, generator=torch.Generator().manual_seed(seed)).to(dtype)
        return positions.to(device), query.to(device), _reference_rotation(query, positions, per_token)

    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        worst = 0.0
        for seed in range(3):
            positions, query, expected = load(seed, dtype)
            worst = max(worst, float((step(positions, query).cpu().to(torch.float64) - expected).abs().max()))
        report.check("lookup", f"eager, scales mixed per token, {label}", worst, ROTATE_TOL[dtype])
        compiled = torch.compile(step, dynamic=True)
        worst = 0.0
        for seed in range(3):
            positions, query, expected = load(seed, dtype)
            worst = max(worst, float((compiled(positions, query).cpu().to(torch.float64) - expected).abs().max()))
        report.check("compile", f"torch.compile, offsets rewritten between calls, {label}", worst, ROTATE_TOL[dtype])
        if not device.startswith("cuda"):
            report.skip("graph", f"CUDA graphs need a CUDA device ({label})")
            continue
        positions, query, _ = load(0, dtype)
        static_positions, static_query = positions.clone(), query.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as graph capture requires
                step(static_positions, static_query)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_positions, static_query)
        worst = 0.0
        for seed in range(3):  # new inputs and new offsets written in place, then replay
            positions, query, expected = load(seed, dtype)
            static_positions.copy_(positions)
            static_query.copy_(query)
            graph.replay()
            torch.cuda.synchronize()
            worst = max(worst, float((static_out.cpu().to(torch.float64) - expected).abs().max()))
        report.check("graph", f"CUDA graph replayed with offsets rewritten in place, {label}", worst,
                     ROTATE_TOL[dtype])


def check_rerotate(report: Report, device: str) -> None:
    with torch.device(device):
        tables = build_bucket_tables(ROTARY, SCALING)
    positions = torch.arange(0, SCALING.max_context, 7, device=device)
    keys = torch.randn(positions.numel(), 2 * HEAD, generator=torch.Generator().manual_seed(5)).to(device)
    freqs = {f: bucket_frequencies(ROTARY, SCALING, f) for f in (2.0, 8.0)}
    for dtype in (torch.float32, torch.bfloat16):
        cached = rotate_keys(keys.to(torch.float32), tables.cos_sin_cache[tables.row_offset(2.0):].index_select(
            0, positions), head_size=HEAD, is_neox=True).to(dtype)
        delta = delta_table(tables, 2.0, 8.0).to(device)
        fast = rerotate(cached, positions, delta, head_size=HEAD, is_neox=True)
        expected = rerotate_reference(cached.cpu(), positions.cpu(), freqs[2.0], freqs[8.0], head_size=HEAD,
                                      is_neox=True)
        value = float((fast.cpu().to(torch.float64) - expected.to(torch.float64)).abs().max())
        report.check("rerotate", f"bucket 2 -> 8, {positions.numel()} keys, {str(dtype).removeprefix('torch.')}",
                     value, ROTATE_TOL[dtype])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON of every check, rewritten after each stage")
    args = parser.parse_args(argv)
    report = Report(args.out, args.device)
    for stage in (check_tables, check_lookup, check_rerotate):
        started = time.perf_counter()
        stage(report, args.device)
        report.stage_done(stage.__name__.removeprefix("check_"), time.perf_counter() - started)
    checks = [c for c in report.data["checks"] if "passed" in c]
    print(f"{len(checks) - report.failed} passed, {report.failed} failed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
