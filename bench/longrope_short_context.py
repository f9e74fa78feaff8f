"""LongRoPE on short windows: vLLM's per-engine long factors against ropeserve's short factors.

vLLM serves a ``longrope`` model (Phi-3) past its original context L only by giving every request the long
factors (``max_model_len > L``, vLLM PR #27431), "at the cost of some performance degradation for shorter
sequences"; ropeserve gives a request that fits L the short factors. This measures that cost on text: the
perplexity of book windows of 1k..8k tokens (all <= L) on the default model (SmolLM2-135M, L = 8192,
rope_theta 1e5) given a LongRoPE configuration up to 64k: short factors 1 with magnitude 1 (the model as
trained), long factors those of YaRN's by-parts interpolation at x8 (the per-pair ratio of plain to YaRN
frequencies, the shape LongRoPE's search finds) with LongRoPE's default magnitude ``sqrt(1 + ln 8 / ln L)``.
No public Phi-3 checkpoint can be fetched here, so the lists are made, not searched; the mechanism measured
is vLLM's and ropeserve's own. Three engines, float32: stock vLLM serving 64k (long factors), ropeserve
serving 64k (``ROPESERVE_DYNAMIC_ROPE=1``), and stock vLLM at ``max_model_len`` = L (short factors), which
ropeserve must equal bit for bit::

    python bench/longrope_short_context.py                 # 8k tokens per length, one book
    python bench/longrope_short_context.py --tokens 16384  # more windows
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

L, THETA, HEAD, MAX_FACTOR = 8192, 100000.0, 64, 8
LENGTHS = (1024, 2048, 4096, 8192)
OFFSET = 2000  # windows start past the book's front matter, as the short-context experiment's do


def longrope_parameters() -> dict:
    """The default model's LongRoPE configuration (see the module docstring)."""
    from rope_ext import RopeScaling, RotaryConfig, compute_frequencies

    rotary = RotaryConfig(HEAD, THETA)
    scaling = RopeScaling(method="yarn", original_max_position=L, max_factor=MAX_FACTOR)
    plain = compute_frequencies("default", rotary, scaling, 1.0).inv_freq
    by_parts = compute_frequencies("ntk_by_parts", rotary, scaling, MAX_FACTOR).inv_freq
    return {"rope_type": "longrope", "rope_theta": THETA, "original_max_position_embeddings": L,
            "short_factor": [1.0] * (HEAD // 2), "short_mscale": 1.0,
            "long_factor": [round(float(x), 6) for x in plain / by_parts]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens scored per length (default 8192)")
    parser.add_argument("--book", default="katrine")
    parser.add_argument("--save", help="also write every window's logprobs to this JSON file")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from bench.evals.inputs import read_book, scored, window_count, windows
    from server.default_model import default_model_dir
    from server.offline import EngineSpec, Request, run_offline

    model = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokens = tokenizer(read_book(args.book), add_special_tokens=False)["input_ids"]
    lengths, batches = [], []
    for n in LENGTHS:
        for window in windows(tokens, n, window_count(n, args.tokens, len(tokens), OFFSET), offset=OFFSET,
                              bos=tokenizer.bos_token_id):
            lengths.append(n)
            batches.append([Request(prompt_token_ids=window, max_tokens=1, logprobs=None, prompt_logprobs=0)])
    overrides = {"rope_parameters": longrope_parameters(), "max_position_embeddings": L * MAX_FACTOR}
    env = {"VLLM_CPU_ATTN_SPLIT_KV": "0"}
    engines = {
        "stock vLLM serving 64k (long factors for every request)": (L * MAX_FACTOR, env),
        "ropeserve serving 64k (short factors up to L)": (L * MAX_FACTOR, {**env, "ROPESERVE_DYNAMIC_ROPE": "1"}),
        "stock vLLM at max_model_len = L (short factors)": (L, env),
    }
    results = {}
    for name, (max_model_len, engine_env) in engines.items():
        spec = EngineSpec(model=model, dtype="float32", max_model_len=max_model_len, hf_overrides=overrides,
                          enable_prefix_caching=False, kv_cache_gib=4, env=engine_env)
        results[name] = [scored(batch[0].prompt_logprobs) for batch in run_offline(spec, batches, timeout=3600)]
        print(f"done: {name}", file=sys.stderr)

    if args.save:
        Path(args.save).write_text(json.dumps({"lengths": lengths, "results": results}))
    names = list(engines)

    def perplexity(name: str, n: int) -> float:
        lps = [lp for length, window in zip(lengths, results[name]) if length == n for lp in window]
        return math.exp(-sum(lps) / len(lps))

    print("| engine | " + " | ".join(f"{n // 1024}k" for n in LENGTHS) + " |")
    print("|---|" + "---|" * len(LENGTHS))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{perplexity(name, n):.3f}" for n in LENGTHS) + " |")
    base = names[2]
    print("| long factors against short (%) | " + " | ".join(
        f"{100 * (perplexity(names[0], n) / perplexity(base, n) - 1):+.2f}" for n in LENGTHS) + " |")
    same = sum(a == b for a, b in zip(results[names[1]], results[base]))
    print(f"\nropeserve's windows equal to stock's short-factor engine, bit for bit: {same}/{len(batches)}")
    return 0 if same == len(batches) else 1


if __name__ == "__main__":
    raise SystemExit(main())
