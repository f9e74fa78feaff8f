"""Benchmark: the cliff past L, teacher-forced, by position band: what growing buys over overflowing.

A request that generates past its bucket's capacity and keeps its scale (``growth="reserve"`` without
``max_tokens``; a request pinned by an override did, until such requests were refused or capped at their
bucket) computes its tokens past L with plain RoPE. Greedy generation of the default model loops with or
without growth, so this is measured teacher-forced: the perplexity of book text (``--length`` tokens,
default 2 L, from each of the two books at each offset) by position band past L (L..1.25L, 1.25L..1.5L,
1.5L..1.75L, 1.75L..2L), computed three ways (bf16, prefix caching off, the default model):

- ``overflow``: plain RoPE past L, as an overflowing request computes it: stock vLLM without scaling,
  its context raised to the document's length (the plugin's bucket 1 is the same plain RoPE table, and it
  no longer lets a request pinned at factor 1 run past L);
- ``default``: as the default growth computes it (the plugin engine, no override): a request is computed
  again at the next bucket when it crosses L, so every token past L is computed at factor 2 from a fresh
  prefill: for a prompt past L that is what the engine admits it at;
- ``fresh x2``: one fresh request at factor 2 on the plugin engine (``rope_factor: 2``).

``default`` and ``fresh x2`` are the same computation (the script says whether they are bit for bit);
``overflow`` is the price of not growing::

    python bench/growth_cliff.py                    # both books, offsets 0 and 30000, 16384 tokens
    python bench/growth_cliff.py --offsets 0 --length 12288
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.evals.inputs import read_book, truncated_document  # noqa: E402
from server.offline import EngineSpec, Request, run_offline  # noqa: E402

L, MAX_FACTOR, THETA = 8192, 8.0, 100000.0
PLUGIN = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": THETA, "factor": MAX_FACTOR,
                              "original_max_position_embeddings": L}}
PLUGIN_WAYS = {"default": None, "fresh x2": {"rope_factor": 2}}  # extra_args on the plugin engine
WAYS = ("overflow", *PLUGIN_WAYS)  # "overflow": the stock engine


def bands(length: int) -> list[tuple[int, int]]:
    """Quarter-L bands of positions from L to ``length``."""
    edges = list(range(L, length + 1, L // 4))
    return list(zip(edges, edges[1:]))


def band_perplexity(prompt_logprobs: list[float | None], band: tuple[int, int]) -> float:
    """exp(-mean logprob) of the tokens at positions [start, end) (position p: the p-th token, 0-based)."""
    values = prompt_logprobs[band[0]:band[1]]
    return math.exp(-sum(values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2 * L)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 30000])
    parser.add_argument("--books", nargs="+", default=["katrine", "news-from-nowhere"])
    parser.add_argument("--cpu-bind", help="VLLM_CPU_OMP_THREADS_BIND (e.g. 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "growth_cliff.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from server.default_model import prepare

    model = str(prepare())
    tokenizer = AutoTokenizer.from_pretrained(model)
    documents = [(book, offset, truncated_document(tokenizer(read_book(book), add_special_tokens=False).input_ids,
                                                   args.length + 1, tokenizer.bos_token_id, offset=offset))
                 for book in args.books for offset in args.offsets]
    def scored(ids: list[int], extra: dict | None = None) -> list[Request]:
        return [Request(prompt_token_ids=ids, max_tokens=1, logprobs=None, prompt_logprobs=0, extra_args=extra)]

    env = {"VLLM_CPU_OMP_THREADS_BIND": args.cpu_bind} if args.cpu_bind else {}
    plugin = EngineSpec(model=model, dtype="bfloat16", max_model_len=int(L * MAX_FACTOR), hf_overrides=PLUGIN,
                        enable_prefix_caching=False, kv_cache_gib=2, env=env)
    stock = EngineSpec(model=model, dtype="bfloat16", max_model_len=args.length + 1,
                       hf_overrides={"max_position_embeddings": args.length + 1}, enable_prefix_caching=False,
                       kv_cache_gib=2, env=env)
    results = run_offline(plugin, [scored(ids, extra) for _, _, ids in documents for extra in PLUGIN_WAYS.values()],
                          timeout=14400)
    plain = run_offline(stock, [scored(ids) for _, _, ids in documents], timeout=14400)
    table = {way: [[] for _ in bands(args.length)] for way in WAYS}
    identical = []
    for d, (book, offset, _) in enumerate(documents):
        per_way = {"overflow": plain[d][0].prompt_logprobs,
                   **{way: results[d * len(PLUGIN_WAYS) + w][0].prompt_logprobs for w, way in enumerate(PLUGIN_WAYS)}}
        identical.append(per_way["default"] == per_way["fresh x2"])
        for way, logprobs in per_way.items():
            for b, band in enumerate(bands(args.length)):
                table[way][b].append(band_perplexity(logprobs, band))
    header = "positions".ljust(16) + "".join(f"{way:>12}" for way in WAYS)
    print(f"{len(documents)} documents of {args.length} tokens ({', '.join(args.books)}; offsets "
          f"{', '.join(map(str, args.offsets))}); mean perplexity by band:\n{header}")
    rows = []
    for b, (start, end) in enumerate(bands(args.length)):
        means = {way: sum(table[way][b]) / len(table[way][b]) for way in WAYS}
        rows.append({"band": [start, end], **means})
        print(f"{start:>6}-{end:<9}" + "".join(f"{means[way]:>12.2f}" for way in WAYS))
    print(f"default == fresh x2, bit for bit: {sum(identical)}/{len(identical)} documents")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "identical": identical,
                                    "per_document": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
