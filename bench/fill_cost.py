"""Benchmark: what the plugin adds to each engine step, against the step itself, on the same batches.

One engine (the default model, bf16, the plugin, vLLM's compiled CPU mode) runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the plugin's per-step work and the step can be timed around
the same calls: the workers' offset fill (``RunnerRope.apply`` + ``fill``: the scheduler's factors taken,
one offset per token written, tokens counted), the scheduler's part (``SchedulerRope.grow`` before vLLM
schedules, ``annotate`` after) and the model runner's whole step (``execute_model``). Decode batches of
1, 64 and 256 running requests (16-token prompts, requests at factors 1, 2 and 4 alternately, 32 new
tokens each); printed per batch size: mean microseconds of each, and their ratios to the step (target:
the fill under 1 % of the step at 256 running requests)::

    python bench/fill_cost.py
    python bench/fill_cost.py --running 1 64 256 512 --new-tokens 16
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

L, MAX_FACTOR, THETA = 8192, 8.0, 100000.0
PLUGIN = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": THETA, "factor": MAX_FACTOR,
                              "original_max_position_embeddings": L}}


def _timed(owner, name: str, samples: list[float]) -> None:
    """Wrap ``owner.name`` to record the duration of each call (seconds)."""
    original = getattr(owner, name)

    @functools.wraps(original)  # the plugin's start-up checks read the wrapped method's signature
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            samples.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def _runner_classes(version) -> list[type]:
    """The model runner classes of this vLLM's adapter that define their own ``execute_model`` (one of them
    runs the engine; a runner that cannot be imported here, such as the V2 runner without Triton, cannot)."""
    classes = []
    for hook in version.RUNNERS:
        try:
            cls = hook.runner_class()
        except ImportError:
            continue
        if "execute_model" in vars(cls):
            classes.append(cls)
    return classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--eager", action="store_true", help="vLLM's eager mode instead of compiled")
    parser.add_argument("--dtype", default="bfloat16", help="float32 where bf16 is slow")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from rope_ext.vllm_plugin.runner import RunnerRope
    from rope_ext.vllm_plugin.scheduler import SchedulerRope
    from rope_ext.vllm_plugin.versions import adapter
    from server.default_model import prepare

    samples: dict[str, list[float]] = collections.defaultdict(list)
    for owner, name, key in ((RunnerRope, "apply", "fill"), (RunnerRope, "fill", "fill"),
                             (SchedulerRope, "grow", "scheduler"), (SchedulerRope, "annotate", "scheduler"),
                             *((runner, "execute_model", "step") for runner in _runner_classes(adapter()))):
        _timed(owner, name, samples[f"{key}:{name}"])
    print(f"vLLM {vllm.__version__}, {args.dtype}, {'eager' if args.eager else 'compiled'}")
    llm = LLM(model=str(prepare()), dtype=args.dtype, max_model_len=int(L * MAX_FACTOR), hf_overrides=PLUGIN,
              enforce_eager=args.eager, max_num_seqs=max(args.running), enable_prefix_caching=False)
    factors = (1, 2, 4)
    print(f"{'running':>8} {'steps':>6} {'step us':>10} {'fill us':>9} {'sched us':>9} {'fill/step':>10} "
          f"{'sched/step':>11}")
    for running in args.running:
        prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 40000 + 100 for j in range(16)]) for i in range(running)]
        params = [SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True,
                                 extra_args={"rope_factor": factors[i % 3]}) for i in range(running)]
        llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
        for values in samples.values():
            values.clear()
        llm.generate(prompts, params, use_tqdm=False)
        # Decode steps only: the last args.new_tokens - 1 steps ran every request for one token.
        decode = slice(-(args.new_tokens - 1), None)
        step = statistics.mean(samples["step:execute_model"][decode])
        fill = statistics.mean(a + f for a, f in zip(samples["fill:apply"][decode], samples["fill:fill"][decode]))
        sched = statistics.mean(g + a for g, a in zip(samples["scheduler:grow"][decode],
                                                      samples["scheduler:annotate"][decode]))
        print(f"{running:>8} {len(samples['step:execute_model']):>6} {1e6 * step:>10.0f} {1e6 * fill:>9.1f} "
              f"{1e6 * sched:>9.1f} {fill / step:>9.3%} {sched / step:>10.3%}")


if __name__ == "__main__":
    main()
