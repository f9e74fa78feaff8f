"""Benchmark: vLLM's eager mode against its compiled mode on CPU, with the plugin, side by side in one run.

Each mode is one engine (the default model, bf16, the plugin up to factor 8, ``server.offline``) started
the same way, one after the other, running the same requests: start-up time (engine start to ready),
prefill tokens/s at 2k and 16k prompt tokens (one request, one new token), decode tokens/s with 1 and
with 16 running requests (64-token prompts, 128 new tokens each). ``--batched-tokens`` adds compiled
engines with other ``max_num_batched_tokens`` (the chunk a long prompt is prefilled in; vLLM's CPU
default: 2048) for the 16k prefill, and reports the machine's peak memory while each engine ran
(``peak_gib``), so a faster setting can be checked against the 24 GiB of the test machines::

    python bench/compile_modes.py                       # eager vs compiled
    python bench/compile_modes.py --batched-tokens 2048 8192
    python bench/compile_modes.py --quick               # 2k and 8k prompts, fewer tokens
    python bench/compile_modes.py --quick --cpu-binds auto 0-1   # + compiled engines per worker binding

The run gets a fresh vLLM cache root and inductor cache (``VLLM_CACHE_ROOT``, ``TORCHINDUCTOR_CACHE_DIR``):
the compiled engine starts cold, and the ``compiled, warm start`` engine after it is the same configuration
started again, which loads the first one's compiled model from vLLM's AOT cache (the reload the plugin makes
work on CPU, ``rope_ext/vllm_plugin/aot_reload.py``): the start-up a user sees from the second ``make serve``
on. ``--cpu-binds`` adds warm compiled engines with these ``VLLM_CPU_OMP_THREADS_BIND`` values (``auto``,
vLLM's default, leaves one core per worker to the engine core's process on x86; ``0-1`` gives the worker's
OpenMP threads both cores of a 2-core machine).

Printed: one row per measure, one column per engine, and compiled / eager ratios (above 1: compiled is
faster, for rates; start-up is a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.offline import EngineSpec, Request, run_offline  # noqa: E402

L, MAX_FACTOR, THETA = 8192, 8.0, 100000.0
PLUGIN = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": THETA, "factor": MAX_FACTOR,
                              "original_max_position_embeddings": L}}


@dataclasses.dataclass
class Variant:
    name: str
    eager: bool
    batched_tokens: int | None = None
    cpu_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND; None: --cpu-bind, else vLLM's default


class MemoryPeak:
    """The machine's peak used memory above what was used when it started (sampled twice a second):
    the engine's processes, plus whatever else runs meanwhile."""

    def __init__(self) -> None:
        import psutil

        self._used = lambda: psutil.virtual_memory().used
        self.base = self._used()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self._used() - self.base)

    def __enter__(self) -> "MemoryPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def workload(tokens: list[int], prefill: tuple[int, ...], decode_tokens: int) -> list[list[Request]]:
    """The batches: one prefill request per length, then decode with 1 and with 16 running requests."""
    batches = [[Request(prompt_token_ids=tokens[1000:1000 + n], max_tokens=1, logprobs=None,
                        cache_salt=f"prefill-{n}")] for n in prefill]
    for running in (1, 16):
        batches.append([Request(prompt_token_ids=tokens[200 * i:200 * i + 64], max_tokens=decode_tokens,
                                logprobs=None, cache_salt=f"decode-{running}-{i}") for i in range(running)])
    return batches


def run(model_dir: str, variant: Variant, batches, *, core: str | None, cache: str) -> dict:
    extra = {"enforce_eager": variant.eager}
    if variant.batched_tokens:
        extra["max_num_batched_tokens"] = variant.batched_tokens
    env = {"VLLM_CACHE_ROOT": f"{cache}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor"}
    if variant.cpu_bind or core:
        env["VLLM_CPU_OMP_THREADS_BIND"] = variant.cpu_bind or core
    spec = EngineSpec(model=model_dir, dtype="bfloat16", max_model_len=int(L * MAX_FACTOR), hf_overrides=PLUGIN,
                      kv_cache_gib=4, env=env, extra=extra)
    start = time.perf_counter()
    with MemoryPeak() as memory:
        results = run_offline(spec, batches, timeout=7200)
    wall = time.perf_counter() - start
    peak_gib = memory.peak / 2**30
    generate = sum(batch[0].seconds for batch in results)
    out: dict[str, float] = {"start_up_s": wall - generate, "peak_gib": peak_gib}
    for batch in results:
        first = batch[0]
        if len(batch) == 1 and len(first.token_ids) == 1:
            out[f"prefill_{first.num_prompt_tokens // 1024}k_tok_s"] = first.num_prompt_tokens / first.seconds
        else:
            out[f"decode_{len(batch)}_running_tok_s"] = sum(len(r.token_ids) for r in batch) / first.seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prefill at 2k and 8k, 32 new tokens")
    parser.add_argument("--batched-tokens", type=int, nargs="*", default=[],
                        help="also compiled engines with these max_num_batched_tokens")
    parser.add_argument("--cpu-bind", help="VLLM_CPU_OMP_THREADS_BIND for every engine (e.g. 1)")
    parser.add_argument("--cpu-binds", nargs="*", default=[],
                        help="also warm compiled engines with these VLLM_CPU_OMP_THREADS_BIND values (auto, 0-1)")
    args = parser.parse_args()
    prefill = (2048, 8192) if args.quick else (2048, 16384)
    decode_tokens = 32 if args.quick else 128

    from transformers import AutoTokenizer

    from server.default_model import prepare

    model_dir = str(prepare())
    text = (REPO.parent / "shared" / "data" / "books" / "katrine.txt").read_text(encoding="utf-8")
    tokens = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False).input_ids
    batches = workload(tokens, prefill, decode_tokens)
    variants = [Variant("eager", True), Variant("compiled", False), Variant("compiled, warm start", False)]
    variants += [Variant(f"compiled, {n} batched", False, n) for n in args.batched_tokens]
    variants += [Variant(f"compiled, bind {b}", False, cpu_bind=b) for b in args.cpu_binds]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ropeserve-compile-modes-") as cache:
        for variant in variants:
            print(f"running {variant.name} ...", flush=True)
            rows[variant.name] = run(model_dir, variant, batches, core=args.cpu_bind, cache=cache)
    keys = list(rows["eager"])
    names = list(rows)
    print(f"\n{'':28}" + "".join(f"{n:>22}" for n in names) + f"{'compiled/eager':>16}")
    for key in keys:
        values = [rows[n].get(key) for n in names]
        cells = "".join(f"{v:>22.2f}" if v is not None else f"{'-':>22}" for v in values)
        print(f"{key:28}{cells}{rows['compiled'][key] / rows['eager'][key]:>16.3f}")


if __name__ == "__main__":
    main()
