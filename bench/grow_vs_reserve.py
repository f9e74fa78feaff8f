"""Benchmark: end-to-end throughput of growth ("rerotate": a request starts at the bucket of its prompt and its
cached keys are re-rotated when it outgrows it) against the default ("reserve": the bucket is chosen for
prompt + max_tokens up front), on one mixed workload, with the same engine settings otherwise.

The workload (token windows of a novel from shared/data/books, greedy, all submitted at once): short
requests that stay in bucket 1 either way, and boundary requests whose prompt fits L but whose prompt +
max_tokens does not. Under "reserve" the boundary requests run at factor 2 from their first token; under
"rerotate" they run at factor 1 (exactly the unscaled model) until they reach L tokens, then every layer's
cached keys are re-rotated to factor 2 and decoding goes on. RoPE's scale does not change the arithmetic of
a step, so the difference in throughput is the price of the re-rotations (and of growable requests not
sharing prefix-cache blocks); what growth buys is quality: the tokens before L are computed at scale 1.

The two engines run one after the other (vLLM CPU, the plugin, bf16, default model, ``enforce_eager``);
printed: wall time, generated tokens per second, the ratio, and which requests re-rotated (their first
token after L); JSON in bench/out/grow_vs_reserve.json::

    python bench/grow_vs_reserve.py                   # 12 short + 6 boundary requests, a few minutes
    python bench/grow_vs_reserve.py --boundary 12 --new-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rope_ext import RopeScaling, choose_factor  # noqa: E402
from server.offline import EngineSpec, Request, run_offline  # noqa: E402

L = 8192
BUCKETS = (1.0, 2.0, 4.0, 8.0)
ROPE_THETA = 100000.0  # SmolLM2-135M's


def overrides(growth: str) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": ROPE_THETA, "factor": BUCKETS[-1],
                                "original_max_position_embeddings": L, "buckets": list(BUCKETS),
                                "growth": growth}}


def book_tokens(model_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    shared = Path(os.environ.get("ROPESERVE_SHARED", REPO.parent / "shared"))
    text = (shared / "data" / "books" / "katrine.txt").read_text(encoding="utf-8")
    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False).input_ids


def workload(tokens: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    kinds = ["boundary"] * args.boundary + ["short"] * args.short
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        boundary = kind == "boundary"
        prompt_len = rng.randint(L - args.new_tokens // 2, L - 64) if boundary else rng.randint(200, 1500)
        start = rng.randrange(0, len(tokens) - prompt_len)
        plan.append({"kind": kind, "prompt_len": prompt_len,
                     "new_tokens": args.new_tokens if boundary else args.short_new_tokens,
                     "prompt": tokens[start:start + prompt_len]})
    return plan


def with_factors(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each request of ``plan`` with the factor it runs at under "reserve" and starts at under "rerotate"."""
    scaling = {growth: RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=BUCKETS[-1],
                                   buckets=BUCKETS, growth=growth) for growth in ("reserve", "rerotate")}
    return [{**p, "reserve_factor": choose_factor(p["prompt_len"], p["new_tokens"], scaling["reserve"]),
             "grow_start_factor": choose_factor(p["prompt_len"], p["new_tokens"], scaling["rerotate"])} for p in plan]


def run(model_dir: str, growth: str, plan: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    spec = EngineSpec(model=model_dir, dtype=args.dtype, max_model_len=int(L * BUCKETS[-1]),
                      hf_overrides=overrides(growth), kv_cache_gib=args.kv_cache_gib,
                      max_num_seqs=len(plan), env={"VLLM_CPU_OMP_THREADS_BIND": args.cpu_bind})
    batch = [Request(prompt_token_ids=p["prompt"], max_tokens=p["new_tokens"], logprobs=None) for p in plan]
    started = time.perf_counter()
    (results,) = run_offline(spec, [batch], timeout=args.timeout_s)
    total = time.perf_counter() - started
    seconds = results[0].seconds  # the generate call alone (no engine start)
    generated = sum(len(r.token_ids) for r in results)
    return {"growth": growth, "generate_s": round(seconds, 2), "with_start_s": round(total, 2),
            "generated_tokens": generated, "tokens_per_s": round(generated / seconds, 2),
            "token_ids": [r.token_ids for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the prepared default model)")
    parser.add_argument("--short", type=int, default=12, help="short requests (200-1500 prompt tokens)")
    parser.add_argument("--boundary", type=int, default=6, help="requests that cross L while generating")
    parser.add_argument("--new-tokens", type=int, default=512, help="max_tokens of a boundary request")
    parser.add_argument("--short-new-tokens", type=int, default=128, help="max_tokens of a short request")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--cpu-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND (default: core 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "grow_vs_reserve.json")
    parser.add_argument("--dry-run", action="store_true", help="print the workload and each request's factors")
    args = parser.parse_args()
    if args.model is None:
        from server.default_model import prepare

        args.model = str(prepare())
    plan = with_factors(workload(book_tokens(args.model), args))
    if args.dry_run:
        for p in plan:
            print({k: v for k, v in p.items() if k != "prompt"})
        return
    runs = [run(args.model, growth, plan, args) for growth in ("reserve", "rerotate")]
    reserve, grow = runs
    regrown = [i for i, p in enumerate(plan) if p["grow_start_factor"] < p["reserve_factor"]]
    print(f"workload: {args.short} short + {args.boundary} boundary requests, {args.dtype}; "
          f"{len(regrown)} re-rotate once under grow (bucket 1 -> 2 at token {L})")
    print(f"{'growth':<8} {'generate s':>11} {'tokens':>7} {'tokens/s':>9}")
    for r in runs:
        print(f"{r['growth']:<8} {r['generate_s']:>11.1f} {r['generated_tokens']:>7} {r['tokens_per_s']:>9.2f}")
    ratio = grow["tokens_per_s"] / reserve["tokens_per_s"]
    same_before_l = sum(grow["token_ids"][i] == reserve["token_ids"][i] for i in range(len(plan))
                        if i not in regrown)
    print(f"throughput grow / reserve: x{ratio:.3f}; requests that never grow: {same_before_l}/"
          f"{len(plan) - len(regrown)} identical outputs under both settings")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
        "plan": [{k: v for k, v in p.items() if k != "prompt"} for p in plan],
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs], "throughput_ratio": ratio,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
