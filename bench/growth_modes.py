"""Benchmark: the growth modes side by side on one mixed workload with a shared system prompt.

``recompute`` (the default: a request starts at the bucket of its prompt and its next ``generation_reserve``
tokens, the look-ahead, and when it is about to outgrow it, is computed again at the next one), ``reserve``
(the bucket is chosen for prompt + max_tokens up front) and ``rerotate`` (like recompute, but its cached
keys are re-rotated), with the same engine settings otherwise. A mode may name its look-ahead:
``recompute@0`` is recompute without one (the paper's rule: the bucket of the prompt alone). The workload
(token windows of a novel from shared/data/books, greedy, all submitted at once): every prompt starts with
the same system prompt (``--system`` tokens), then short requests that stay in bucket 1 under every mode,
and boundary requests whose prompt fits L but whose prompt + max_tokens does not (prompts spread over the
last ``--new-tokens`` tokens before L): they cross L while generating. RoPE's scale does not change the
arithmetic of a step, so differences in throughput are each mode's price: recompute prefills a boundary
request once more at its crossing (unless its look-ahead started it above L), rerotate converts its keys
but gives every request that may grow a cache salt of its own (no prefix-cache hits), reserve pays
nothing but runs the boundary requests at factor 2 from their first token.

The engines run one after the other (vLLM CPU, the plugin, bf16, the default model); printed: wall time of
the generate call, generated tokens per second and its ratio to ``reserve`` (target for the default:
>= 0.98), the prefix-cache hit rate (vLLM's ``num_cached_tokens`` over prompt tokens), and whether the
requests that never cross L produced the same tokens under every mode; JSON in bench/out/growth_modes.json::

    python bench/growth_modes.py                   # 12 short + 6 boundary requests, every mode
    python bench/growth_modes.py --modes recompute recompute@0 reserve --new-tokens 1024 --eager
    python bench/growth_modes.py --dry-run         # the workload and each request's factors
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
from server.engine_process import hf_overrides  # noqa: E402
from server.offline import EngineSpec, Request, run_offline  # noqa: E402

L = 8192
BUCKETS = (1.0, 2.0, 4.0, 8.0)
ROPE_THETA = 100000.0  # SmolLM2-135M's
MODES = ("recompute", "recompute@0", "reserve", "rerotate")


def parse_mode(mode: str) -> tuple[str, int | None]:
    """``"recompute@0"`` -> ("recompute", 0): a growth mode and its look-ahead (None: the default)."""
    growth, _, reserve = mode.partition("@")
    return growth, int(reserve) if reserve else None


def scaling_for(mode: str) -> RopeScaling:
    growth, reserve = parse_mode(mode)
    extra = {} if reserve is None else {"generation_reserve": reserve}
    return RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=BUCKETS[-1], buckets=BUCKETS,
                       growth=growth, **extra)


def overrides(mode: str) -> dict[str, Any]:
    """The engine's ``--hf-overrides`` for ``mode``: the embedded engine's own (server.engine_process)."""
    return hf_overrides(scaling_for(mode), ROPE_THETA)


def book_tokens(model_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    shared = Path(os.environ.get("ROPESERVE_SHARED", REPO.parent / "shared"))
    text = (shared / "data" / "books" / "katrine.txt").read_text(encoding="utf-8")
    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False).input_ids


def workload(tokens: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Requests that share the first ``args.system`` tokens (a system prompt), then a window of their own."""
    rng = random.Random(args.seed)
    system = tokens[:args.system]
    kinds = ["boundary"] * args.boundary + ["short"] * args.short
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        boundary = kind == "boundary"
        prompt_len = rng.randint(L - args.new_tokens + 64, L - 64) if boundary else rng.randint(
            args.system + 200, args.system + 1500)
        own = prompt_len - args.system
        start = rng.randrange(args.system, len(tokens) - own)
        plan.append({"kind": kind, "prompt_len": prompt_len,
                     "new_tokens": args.new_tokens if boundary else args.short_new_tokens,
                     "prompt": system + tokens[start:start + own]})
    return plan


def with_factors(plan: list[dict[str, Any]], modes: tuple[str, ...] | list[str] = MODES) -> list[dict[str, Any]]:
    """Each request of ``plan`` with the factor it starts at under each mode (rope_ext.policy); an unknown
    mode fails here, before any engine starts."""
    scaling = {mode: scaling_for(mode) for mode in modes}
    return [{**p, **{f"{mode}_start": choose_factor(p["prompt_len"], p["new_tokens"], scaling[mode])
                     for mode in modes}} for p in plan]


def run(model_dir: str, mode: str, plan: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    spec = EngineSpec(model=model_dir, dtype=args.dtype, max_model_len=int(L * BUCKETS[-1]),
                      hf_overrides=overrides(mode), kv_cache_gib=args.kv_cache_gib,
                      max_num_seqs=len(plan), env={"VLLM_CPU_OMP_THREADS_BIND": args.cpu_bind},
                      extra={"enforce_eager": args.eager})
    batch = [Request(prompt_token_ids=p["prompt"], max_tokens=p["new_tokens"], logprobs=None) for p in plan]
    started = time.perf_counter()
    (results,), counters = run_offline(spec, [batch], timeout=args.timeout_s, counters=True)
    total = time.perf_counter() - started
    seconds = results[0].seconds  # the generate call alone (no engine start)
    generated = sum(len(r.token_ids) for r in results)
    cached, prompt = sum(r.num_cached_tokens for r in results), sum(r.num_prompt_tokens for r in results)
    return {"growth": mode, "generate_s": round(seconds, 2), "with_start_s": round(total, 2),
            "generated_tokens": generated, "tokens_per_s": round(generated / seconds, 2),
            "prefix_hit_rate": round(cached / prompt, 4), "grown": sum(counters["grown"]),
            "past_capacity_tokens": sum(counters["past"]), "token_ids": [r.token_ids for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the prepared default model)")
    parser.add_argument("--modes", nargs="+", default=list(MODES),
                        help="growth modes, each optionally with its look-ahead: recompute@0 (default: %(default)s)")
    parser.add_argument("--system", type=int, default=1000, help="tokens of the shared system prompt")
    parser.add_argument("--short", type=int, default=12, help="short requests (system + 200..1500 tokens)")
    parser.add_argument("--boundary", type=int, default=6, help="requests that cross L while generating")
    parser.add_argument("--new-tokens", type=int, default=512, help="max_tokens of a boundary request")
    parser.add_argument("--short-new-tokens", type=int, default=128, help="max_tokens of a short request")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--eager", action="store_true", help="vLLM's eager mode (default: compiled)")
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--cpu-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND (default: core 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "growth_modes.json")
    parser.add_argument("--dry-run", action="store_true", help="print the workload and each request's factors")
    args = parser.parse_args()
    if args.model is None:
        from server.default_model import prepare

        args.model = str(prepare())
    plan = with_factors(workload(book_tokens(args.model), args), args.modes)
    if args.dry_run:
        for p in plan:
            print({k: v for k, v in p.items() if k != "prompt"})
        return
    runs = {mode: run(args.model, mode, plan, args) for mode in args.modes}
    crossing = [i for i, p in enumerate(plan) if p["kind"] == "boundary"]
    print(f"workload: {args.short} short + {args.boundary} boundary requests (cross L = {L} while generating), "
          f"{args.system}-token shared system prompt, {args.dtype}")
    base = runs.get("reserve")
    print(f"{'growth':<12} {'generate s':>11} {'tokens':>7} {'tokens/s':>9} {'vs reserve':>11} {'prefix hits':>12} "
          f"{'grown':>6} {'past cap.':>9}")
    for r in runs.values():
        ratio = f"x{r['tokens_per_s'] / base['tokens_per_s']:.3f}" if base else "-"
        print(f"{r['growth']:<12} {r['generate_s']:>11.1f} {r['generated_tokens']:>7} {r['tokens_per_s']:>9.2f} "
              f"{ratio:>11} {r['prefix_hit_rate']:>11.1%} {r['grown']:>6} {r['past_capacity_tokens']:>9}")
    outputs = [r["token_ids"] for r in runs.values()]
    same = sum(all(o[i] == outputs[0][i] for o in outputs) for i in range(len(plan)) if i not in crossing)
    print(f"requests that never cross L: {same}/{len(plan) - len(crossing)} identical outputs under every mode")
    first = next(iter(runs.values()))
    for r in runs.values():  # which mode differs: a short request's tokens depend on what shares its steps
        equal = sum(r["token_ids"][i] == first["token_ids"][i] for i in range(len(plan)) if i not in crossing)
        print(f"  {r['growth']:<12} {equal}/{len(plan) - len(crossing)} identical to {first['growth']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
        "plan": [{k: v for k, v in p.items() if k != "prompt"} for p in plan],
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs.values()],
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
