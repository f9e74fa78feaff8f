"""Benchmark: decode of the default model's engine alone (``vllm.LLM`` in a child process, no HTTP), stock
vLLM against the plugin, to tell the engine's share of a decode gap from the serving path's.

Three engines, one after the other, each the default model at 64k in bfloat16 (this CPU's fastest dtype
here), compiled, the worker's cores as the default set-up binds them (:mod:`server.cpu_cores`): ``stock``
(static YaRN x8, ``VLLM_PLUGINS=none``), ``inert`` (the plugin loaded, the model static: it does nothing)
and ``dynamic`` (the plugin serving dynamic YaRN up to x8). Each runs 16 requests of 64 prompt tokens and
128 new tokens together, then one alone, ``--rounds`` times; printed: generated tokens per second of each
batch (its 64-token prefills included)::

    python bench/engine_decode.py              # about 6 minutes on two cores
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu_speed import FACTOR, L, yarn_overrides
from server.cpu_cores import allowed_cpus, worker_binding
from server.default_model import prepare
from server.offline import EngineSpec, Request, run_offline

ENGINES = {"stock": ("yarn", {"VLLM_PLUGINS": "none"}), "inert": ("yarn", {}), "dynamic": ("dynamic_yarn", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = str(prepare())
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(16)]
    batches = [[Request(prompt_token_ids=prompts[0], max_tokens=4)]]  # first-request costs out
    for i in range(args.rounds):  # fresh salts: no prefix-cache hits
        batches.append([Request(prompt_token_ids=p, max_tokens=128, logprobs=None, cache_salt=f"{i}-{j}")
                        for j, p in enumerate(prompts)])
        batches.append([Request(prompt_token_ids=prompts[0], max_tokens=128, logprobs=None, cache_salt=f"{i}")])
    binding = worker_binding({}, allowed_cpus())[0]
    for name, (rope_type, env) in ENGINES.items():
        spec = EngineSpec(model=model, dtype="bfloat16", max_model_len=L * FACTOR,
                          hf_overrides=yarn_overrides(rope_type), kv_cache_gib=4, env={**binding, **env},
                          extra={"enforce_eager": False})
        for batch in run_offline(spec, batches, timeout=1800)[1:]:
            generated = sum(len(r.token_ids) for r in batch)
            print(f"{name:8} {len(batch):2} running: {generated / batch[0].seconds:7.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
