"""Benchmark: the rope plugin against stock vLLM with static YaRN at the maximum factor.

Both engines are vLLM's OpenAI server on the default model (bf16, CPU), started the same way, one after
the other; the same mixed workload (half short prompts, half long, up to 16k tokens, all submitted at
once, streamed) runs against each. Printed: output tokens/s, mean and p50 time to first token, and the
ratios plugin / stock (targets: throughput >= 0.98, TTFT <= 1.02), plus the memory of the plugin's
stacked cos/sin tables. The two engines compute different things for long prompts (each request at its
own scale vs factor 8 for all) but the same amount of work, so the ratios measure the plugin's cost::

    python bench/plugin_throughput.py --quick      # 8 requests, a few minutes
    python bench/plugin_throughput.py --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.engine_process import EngineProcess, free_port  # noqa: E402

L, MAX_FACTOR, THETA = 8192, 8.0, 100000.0
PLUGIN = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": THETA, "factor": MAX_FACTOR,
                              "original_max_position_embeddings": L}}
STATIC_YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": THETA, "factor": MAX_FACTOR,
                                   "original_max_position_embeddings": L},
               "max_position_embeddings": int(L * MAX_FACTOR)}


def workload(tokens: list[int], n: int, max_long: int, seed: int) -> list[list[int]]:
    """``n`` prompts (token ids): half short (256..2048), half long (L+1k..max_long), shuffled."""
    rng = random.Random(seed)
    lengths = [rng.randint(256, 2048) for _ in range(n - n // 2)]
    lengths += [rng.randint(L + 1024, max_long) for _ in range(n // 2)]
    rng.shuffle(lengths)
    prompts = []
    for length in lengths:
        start = rng.randint(0, len(tokens) - length - 1)
        prompts.append(tokens[start:start + length])
    return prompts


async def _one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    ttft, n = None, 0
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - start
            n += 1
    return ttft or (time.perf_counter() - start), n


async def run_workload(url: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        await _one(client, prompts[0][:64], 2)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    return {"wall_s": wall, "output_tok_s": sum(r[1] for r in results) / wall,
            "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts)}


async def bench_engine(model_dir: str, overrides: dict, prompts, max_tokens: int, kv_gib: int, dtype: str) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
               "--dtype", dtype, "--max-model-len", str(int(L * MAX_FACTOR)),
               "--hf-overrides", json.dumps(overrides)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    async with EngineProcess(command, url=f"http://127.0.0.1:{port}", env=env, max_restarts=0):
        return await run_workload(f"http://127.0.0.1:{port}", prompts, max_tokens)


def table_memory_mb() -> float:
    import torch

    from rope_ext import RopeScaling, RotaryConfig, table_nbytes

    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=MAX_FACTOR)
    return table_nbytes(RotaryConfig(64, THETA), scaling, torch.bfloat16) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 requests, long prompts up to 12k")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-long", type=int, default=16384)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-gib", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="both engines' dtype (float32 where bf16 is slow)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_long = 8, 12288

    from transformers import AutoTokenizer

    from server.default_model import prepare

    model_dir = str(prepare())
    text = (REPO.parent / "shared" / "data" / "books" / "katrine.txt").read_text(encoding="utf-8")
    tokens = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False).input_ids
    prompts = workload(tokens, args.requests, args.max_long, args.seed)
    import vllm

    print(f"vLLM {vllm.__version__}, {args.dtype}, eager; workload: {len(prompts)} requests, "
          f"prompt tokens {sum(map(len, prompts))}, {args.max_tokens} new tokens each")
    stock = asyncio.run(bench_engine(model_dir, STATIC_YARN, prompts, args.max_tokens, args.kv_gib, args.dtype))
    plugin = asyncio.run(bench_engine(model_dir, PLUGIN, prompts, args.max_tokens, args.kv_gib, args.dtype))
    print(f"{'':24}{'stock static YaRN x8':>22}{'plugin':>12}{'ratio':>10}")
    for key in ("output_tok_s", "ttft_mean_s", "ttft_p50_s", "wall_s"):
        print(f"{key:24}{stock[key]:>22.3f}{plugin[key]:>12.3f}{plugin[key] / stock[key]:>10.3f}")
    print(f"throughput ratio (target >= 0.98): {plugin['output_tok_s'] / stock['output_tok_s']:.3f}")
    print(f"TTFT ratio, mean (target <= 1.02): {plugin['ttft_mean_s'] / stock['ttft_mean_s']:.3f}")
    print(f"bucket tables (default model, factor 8, bf16): {table_memory_mb():.1f} MiB")


if __name__ == "__main__":
    main()
