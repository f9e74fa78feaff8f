"""Tensor parallelism 2 on CPU (vLLM's multiprocessing executor, one worker per core): each worker writes
the same per-token offsets from the same scheduler output, so requests at mixed scales in one batch equal
the single-worker engine's within the isolation tolerance the fidelity tests state for batch composition
(TP changes the order of the sums: an all-reduce of two partial products).

A tiny random Qwen2 (two heads, so each worker holds one; its one KV head is replicated), float32, eager,
dynamic YaRN up to 4 x L: short prompts (factor 1), a long one (factor 2) and one pinned at factor 4, each
alone and all together, on TP 1 and TP 2; every result on TP 2 equals TP 1's alone, token for token and
within 1e-4 in logprob. The default model cannot be split in two (nine heads).
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.tiny_models import L, build, rope_parameters

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

ARCH = "Qwen2ForCausalLM"
ISOLATION_TOLERANCE = 1e-4
NEW_TOKENS = 8


def _requests() -> list[Request]:
    rng = random.Random(ARCH)
    tokens = [rng.randrange(512) for _ in range(400)]
    return [Request(prompt_token_ids=tokens[:100], max_tokens=NEW_TOKENS),
            Request(prompt_token_ids=tokens[50:290], max_tokens=NEW_TOKENS),
            Request(prompt_token_ids=tokens, max_tokens=NEW_TOKENS),  # 408 > L: factor 2
            Request(prompt_token_ids=tokens[:120], max_tokens=NEW_TOKENS, extra_args={"rope_factor": 4.0})]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(build(ARCH, tmp_path_factory.mktemp("tp") / "model"))
    requests = _requests()
    batches = [[r] for r in requests] + [[dataclasses.replace(r, cache_salt="together") for r in requests]]
    results = {}
    for tp, bind in ((1, "0"), (2, "0|1")):
        spec = EngineSpec(model=folder, dtype="float32", max_model_len=4 * L,
                          hf_overrides=rope_parameters(ARCH, "dynamic_yarn", 4.0), kv_cache_gib=1, max_num_seqs=8,
                          env={"VLLM_CPU_OMP_THREADS_BIND": bind},
                          extra={"skip_tokenizer_init": True, "tensor_parallel_size": tp,
                                 "distributed_executor_backend": "mp"})
        results[tp] = run_offline(spec, batches, timeout=1500)
    return results


def _close(a, b) -> bool:
    return a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= \
        ISOLATION_TOLERANCE


def test_each_request_alone_on_two_workers_equals_one_worker(runs):
    one, two = runs[1], runs[2]
    for alone_1, alone_2 in zip(one[:-1], two[:-1]):
        assert _close(alone_2[0], alone_1[0])


def test_a_batch_of_mixed_scales_on_two_workers_equals_each_request_alone_on_one(runs):
    alone = [batch[0] for batch in runs[1][:-1]]
    together = runs[2][-1]
    assert all(_close(t, a) for t, a in zip(together, alone))
