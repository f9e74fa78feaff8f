"""Benchmark: the time to re-rotate a 16k-token request's cached keys when it grows a bucket, against
re-prefilling it.

The default model's shape (30 layers, 3 KV heads, head size 64, rope theta 1e5, L = 8192, buckets
1, 2, 4, 8): a request of 16384 tokens outgrows bucket 2 and moves to 4. Timed, one thread (vLLM CPU
binds its compute to one core), median of ``--repeats``:

- ``engine``: what the engine does (``Regrower.rerotate``): 30 paged KV caches in vLLM CPU attention's
  layout (128-token blocks, shuffled block ids, the layout probed through the real backend's
  ``do_kv_cache_update``), gather the request's keys, one rotation by the delta table, scatter back;
- ``fast``: :func:`rope_ext.rerotate.rerotate` on contiguous keys, 30 layers (no paging);
- ``stock``: vLLM's ``ops.rotary_embedding`` on contiguous keys with the delta table, 30 layers;
- ``reference``: :func:`rope_ext.rerotate.rerotate_reference` (float64, two steps), 30 layers;
- ``prefill`` (with ``--prefill``): the engine's time to prefill the same 16384 tokens (vLLM CPU, the
  plugin, one request, ``max_tokens=1``; the engine start is not counted).

Run::

    python bench/rerotate.py                      # bf16 and fp32 conversions, about a minute
    python bench/rerotate.py --prefill            # plus one engine run (bf16) for the prefill time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rope_ext import RopeScaling, RotaryConfig, bucket_frequencies, build_bucket_tables
from rope_ext.rerotate import delta_table, rerotate, rerotate_reference

LAYERS, KV_HEADS, HEAD_SIZE, THETA, L, MAX_FACTOR = 30, 3, 64, 100000.0, 8192, 8.0
TOKENS, FROM, TO, BLOCK = 16384, 2.0, 4.0, 128


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_layer():
    """A stand-in attention layer around vLLM's real CPU backend implementation (its key writer)."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackendImpl,
        _get_attn_isa,
    )

    impl = object.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    return types.SimpleNamespace(impl=impl, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, _k_scale_float=1.0,
                                 _v_scale_float=1.0), _get_attn_isa


def bench_conversion(dtype: torch.dtype, repeats: int) -> dict[str, float]:
    from vllm import _custom_ops as ops
    from vllm.config import VllmConfig, set_current_vllm_config

    from rope_ext.vllm_plugin.regrow import KeySlots, Regrower, _Layer
    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=MAX_FACTOR, growth="rerotate",
                          buckets=(1.0, 2.0, 4.0, 8.0))  # as measured in docs/RESULTS.md
    rotary_cfg = RotaryConfig(HEAD_SIZE, THETA)
    generator = torch.Generator().manual_seed(0)
    keys = [torch.randn(TOKENS, KV_HEADS * HEAD_SIZE, generator=generator).to(dtype) for _ in range(LAYERS)]
    positions = torch.arange(TOKENS)
    out: dict[str, float] = {}

    # The engine path: paged caches, the layout probed through vLLM's CPU backend.
    with set_current_vllm_config(VllmConfig()):
        rotary = PerRequestRotaryEmbedding(HEAD_SIZE, HEAD_SIZE, THETA, True, dtype, scaling=scaling,
                                           rows_per_bucket=scaling.max_context, max_num_tokens=8)
        layer, get_isa = _cpu_layer()
        layer.isa = get_isa(dtype, BLOCK, HEAD_SIZE)
        num_blocks = TOKENS // BLOCK + 8
        block_ids = torch.randperm(num_blocks, generator=generator)[: TOKENS // BLOCK].tolist()
        slots = torch.tensor(block_ids)[positions // BLOCK] * BLOCK + positions % BLOCK
        layers = []
        for i in range(LAYERS):
            cache = torch.zeros(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_SIZE, dtype=dtype)
            k = keys[i].view(TOKENS, KV_HEADS, HEAD_SIZE)
            layer.impl.do_kv_cache_update(layer, k, k, cache, slots)
            layers.append(_Layer(f"layer.{i}", cache, 0, KeySlots.probe(layer, cache, 0)))
        regrower = Regrower(rotary, layers)
        # Alternate directions so that repeated runs keep the keys bounded (each run is one conversion).
        direction = [FROM, TO]

        def engine() -> None:
            regrower.rerotate((block_ids,), TOKENS, direction[0], direction[1])
            direction.reverse()

        out["engine"] = _median_seconds(engine, repeats)
        out["isa"] = layer.isa

    tables = build_bucket_tables(rotary_cfg, scaling)
    delta = delta_table(tables, FROM, TO, num_rows=TOKENS)
    out["fast"] = _median_seconds(
        lambda: [rerotate(k, positions, delta, head_size=HEAD_SIZE) for k in keys], repeats)
    stock_table = delta.to(dtype)
    copies = [k.clone() for k in keys]
    out["stock"] = _median_seconds(
        lambda: [ops.rotary_embedding(positions, k, None, HEAD_SIZE, stock_table, True) for k in copies], repeats)
    freq_a, freq_b = bucket_frequencies(rotary_cfg, scaling, FROM), bucket_frequencies(rotary_cfg, scaling, TO)
    out["reference"] = _median_seconds(
        lambda: [rerotate_reference(k, positions, freq_a, freq_b, head_size=HEAD_SIZE) for k in keys],
        max(1, repeats // 3))
    return out


def bench_prefill(dtype: str) -> float:
    from transformers import AutoTokenizer

    from server.default_model import prepare
    from server.offline import EngineSpec, Request, run_offline

    text = (REPO.parent / "shared" / "data" / "books" / "katrine.txt").read_text(encoding="utf-8")
    model = str(prepare())
    ids = AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False).input_ids[:TOKENS]
    plugin = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": THETA, "factor": MAX_FACTOR,
                                  "original_max_position_embeddings": L}}
    spec = EngineSpec(model=model, dtype=dtype, hf_overrides=plugin, kv_cache_gib=1, max_model_len=TOKENS + 64,
                      enable_prefix_caching=False,
                      # one 16k-token step may take minutes on a busy machine: vLLM's 300 s limit would kill it
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"})
    (_warm,), (timed,) = run_offline(spec, [[Request(prompt_token_ids=ids[:512], max_tokens=1)],
                                           [Request(prompt_token_ids=ids, max_tokens=1)]])
    return timed.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", action="store_true", help="also time a 16k-token prefill in the engine")
    parser.add_argument("--json", type=Path, help="write the results here as well")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, object] = {"tokens": TOKENS, "layers": LAYERS, "from": FROM, "to": TO}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        timings = bench_conversion(dtype, args.repeats)
        results[name] = timings
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in timings.items()), flush=True)
    if args.prefill:
        seconds = bench_prefill("bfloat16")
        results["prefill_bf16_s"] = seconds
        ratio = results["bf16"]["engine"] / seconds
        print(f"prefill of {TOKENS} tokens (bf16, engine): {seconds:.1f} s; re-rotation / prefill = {100 * ratio:.2f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
