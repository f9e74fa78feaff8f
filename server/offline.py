"""Run batches of prompts through ``vllm.LLM`` in a child process and return plain, JSON-able results.

Tests and benchmarks compare engines (stock vLLM, static YaRN, the plugin) on identical inputs. Each
engine configuration runs in a fresh child process (vLLM engines spawn their own processes, hold
memory until exit and cannot be restarted with other settings in one process), once for a whole list
of batches::

    results = run_offline(EngineSpec(model=DIR, dtype="float32", hf_overrides={...}),
                          [[Request(prompt_token_ids=ids, max_tokens=8)], ...])

A request may carry image files for a multimodal model's image placeholders (``images``). Within one batch
all requests are submitted together, so they share engine steps. With
``counters=True`` the plugin's counters at the end of the run come back too (``rope_ext.vllm_plugin.stats``:
requests admitted and tokens scheduled and computed at each bucket; and, for an engine core in the child's
own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), how many compiled models vLLM loaded from its AOT cache)::

    results, counters = run_offline(spec, batches, counters=True)    # counters["computed"][k]: bucket k
    counters["aot_artifacts_loaded"]                                  # [n]
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Keyword arguments of ``vllm.LLM`` plus the environment of the child process."""

    model: str
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    hf_overrides: dict[str, Any] | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 16
    kv_cache_gib: int = 4
    seed: int = 0
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other vllm.LLM keyword

    def llm_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model, "dtype": self.dtype, "enforce_eager": True, "seed": self.seed,
            "enable_prefix_caching": self.enable_prefix_caching, "max_num_seqs": self.max_num_seqs,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.hf_overrides is not None:
            kwargs["hf_overrides"] = self.hf_overrides
        return {**kwargs, **self.extra}


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids, or text) and how to generate from it (greedy unless told otherwise)."""

    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    max_tokens: int = 8
    temperature: float = 0.0
    logprobs: int | None = 1
    prompt_logprobs: int | None = None
    extra_args: dict[str, Any] | None = None
    cache_salt: str | None = None  # a fresh salt keeps the request away from the prefix cache
    images: list[str] | None = None  # image files for the prompt's image placeholders (multimodal models)


@dataclasses.dataclass
class Result:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # logprob of each generated token
    prompt_logprobs: list[float | None] | None
    num_prompt_tokens: int
    num_cached_tokens: int
    seconds: float
    # speculative decoding (with ``per_request_spec_decode_metrics`` set): draft tokens proposed and accepted
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


def _chosen_logprob(step: dict, token_id: int) -> float:
    return step[token_id].logprob


def _run_in_child(spec: dict, batches: list[list[dict]]) -> list[list[dict]]:
    import time

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**EngineSpec(**spec).llm_kwargs())
    out: list[list[dict]] = []
    for batch in batches:
        prompts, params = [], []
        for req in map(lambda r: Request(**r), batch):
            if req.prompt_token_ids is not None:
                prompt = TokensPrompt(prompt_token_ids=req.prompt_token_ids)
            else:
                prompt = {"prompt": req.prompt}
            if req.cache_salt is not None:
                prompt["cache_salt"] = req.cache_salt
            if req.images:
                from PIL import Image

                prompt["multi_modal_data"] = {"image": [Image.open(path).convert("RGB") for path in req.images]}
            prompts.append(prompt)
            params.append(SamplingParams(temperature=req.temperature, max_tokens=req.max_tokens,
                                         logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs,
                                         extra_args=req.extra_args, ignore_eos=True))
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        batch_results = []
        for output in outputs:
            completion = output.outputs[0]
            logprobs = ([_chosen_logprob(step, tok) for step, tok in zip(completion.logprobs, completion.token_ids)]
                        if completion.logprobs else [])
            prompt_lps = None
            if output.prompt_logprobs is not None:
                prompt_lps = [None if step is None else _chosen_logprob(step, tok)
                              for step, tok in zip(output.prompt_logprobs, output.prompt_token_ids)]
            drafts = getattr(completion, "spec_decode_metrics", None)
            batch_results.append(dataclasses.asdict(Result(
                token_ids=list(completion.token_ids), text=completion.text, logprobs=logprobs,
                prompt_logprobs=prompt_lps, num_prompt_tokens=len(output.prompt_token_ids),
                num_cached_tokens=output.num_cached_tokens or 0, seconds=seconds,
                draft_tokens=drafts.num_draft_tokens if drafts else 0,
                accepted_draft_tokens=sum(j * n for j, n in enumerate(drafts.histogram)) if drafts else 0)))
        out.append(batch_results)
    return out


def _counters() -> dict[str, list[int]]:
    from vllm.compilation.counter import compilation_counter

    from rope_ext.vllm_plugin.stats import read_counters

    counts = {kind: values.tolist() for kind, values in read_counters().items()}
    # In this process only: the engine core runs here with VLLM_ENABLE_V1_MULTIPROCESSING=0.
    counts["aot_artifacts_loaded"] = [compilation_counter.num_aot_artifacts_loaded]
    return counts


def run_offline(spec: EngineSpec, batches: list[list[Request]], *, timeout: float = 1800, counters: bool = False):
    """Start one engine with ``spec`` in a child process, run ``batches`` in order, return their results
    (and, with ``counters``, the plugin's counters after the last batch)."""
    with tempfile.TemporaryDirectory(prefix="ropeserve-offline-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"spec": dataclasses.asdict(spec),
                                   "batches": [[dataclasses.asdict(r) for r in b] for b in batches]}))
        # Counters of its own: an inherited ROPESERVE_METRICS_DIR would sum in other engines' counts.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
               "ROPESERVE_METRICS_DIR": str(Path(tmp) / "metrics"), **spec.env}
        proc = subprocess.run([sys.executable, "-m", "server.offline", str(job), str(result)], env=env,
                              timeout=timeout, capture_output=True, text=True)
        # The child writes the result file only once every batch is done (atomically), so a result with a
        # non-zero exit means vLLM died in its teardown ("terminate called without an active exception",
        # seen on busy 2-core machines): the results are complete and are kept.
        if not result.exists():
            raise RuntimeError(f"offline engine failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n"
                               f"{proc.stderr[-6000:]}")
        raw = json.loads(result.read_text())
    results = [[Result(**r) for r in batch] for batch in raw["batches"]]
    return (results, raw["counters"]) if counters else results


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    partial = Path(result_path + ".partial")
    batches = _run_in_child(job["spec"], job["batches"])
    partial.write_text(json.dumps({"batches": batches, "counters": _counters()}))
    os.replace(partial, result_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
