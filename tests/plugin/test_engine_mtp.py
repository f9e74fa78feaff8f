"""An MTP drafter (Qwen3-Next's, the kind Qwen3.5 ships) at each request's scale, on the real engine.

The tiny Qwen3-Next of :func:`tests.plugin.tiny_models.mtp_target`, whose own MTP layer drafts what the target
computes: with the drafter rotating at the request's scale, every draft is accepted. vLLM 0.32's V1 runner
runs MTP through the same ``EagleProposer`` as EAGLE, and the plugin's drafter hook writes each pass's offsets
(:mod:`rope_ext.vllm_plugin.runner`). One plugin engine (dynamic YaRN up to 4, buckets 1, 2, 4), three
speculative tokens, greedy, compiled, bfloat16 (vLLM CPU's Gated DeltaNet runs in bf16 only), prefix caching
off (stock vLLM CPU fails MTP on a hybrid model with it on: a Triton kernel, ``precopy_mamba_align_fused``):

- alone, a short request (factor 1) and a 400-token one (factor 2) have every draft accepted;
- in a batch mixing factors 1 and 2, every draft of every request is accepted.

Measured with the drafter passes' offsets not written (``RunnerRope.fill_draft`` a no-op): the requests
alone still have every draft accepted (one request's tokens all share its offset, whatever the layout), and
in the mixed batch the long requests fall to 16 of 27 and 16 of 24. Stock vLLM with the same MTP layer, at a
static scale, accepts all 18 of 18 drafts for each request alone (plain RoPE short, static YaRN x2 long), and
the plugin's tokens and logprobs equal stock's there (speculation never changes greedy tokens; the target is
proven against stock in test_engine_hybrid.py). Where this machine's runner has no drafters (vLLM 0.34's CPU
runner) or its CPU extension lacks the DeltaNet kernels, the module skips, saying why.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.testbed import no_drafters, no_hybrid_kernels
from tests.plugin.tiny_models import HYBRID, L, mtp_target, rope_parameters, variant

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

SPECULATIVE_TOKENS = 3
NEW_TOKENS = 24


def _tokens(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


# factor 1 (under L = 256 with the 8-token reserve) and factor 2 (over 1.41 x 256 = 362 tokens)
SHORT, LONG = (Request(prompt_token_ids=_tokens(s, n), max_tokens=NEW_TOKENS) for s, n in (("a", 100), ("c", 400)))
MIXED = [dataclasses.replace(Request(prompt_token_ids=_tokens(s, n), max_tokens=NEW_TOKENS), cache_salt="mixed")
         for s, n in (("a", 100), ("c", 400), ("b", 60), ("d", 380))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if why := no_drafters() or no_hybrid_kernels():
        pytest.skip(why)
    root = tmp_path_factory.mktemp("mtp")
    dynamic = rope_parameters(HYBRID, "dynamic_yarn", 4.0, buckets=[1.0, 2.0, 4.0])
    folder = variant(mtp_target(root), root / "dynamic", dynamic["rope_parameters"], dynamic["max_position_embeddings"])
    spec = EngineSpec(model=str(folder), dtype="bfloat16", max_model_len=4 * L, enable_prefix_caching=False,
                      kv_cache_gib=1, max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                      extra={"enforce_eager": False, "skip_tokenizer_init": True,
                             "speculative_config": {"method": "mtp", "num_speculative_tokens": SPECULATIVE_TOKENS},
                             "per_request_spec_decode_metrics": "summary"})
    batches, counters = run_offline(spec, [[SHORT], [LONG], MIXED], timeout=1200, counters=True)
    return {"alone": [b[0] for b in batches[:2]], "mixed": batches[2], "counters": counters}


def _all_accepted(result) -> bool:
    return len(result.token_ids) == NEW_TOKENS and 0 < result.draft_tokens == result.accepted_draft_tokens


def test_every_mtp_draft_is_accepted_for_a_request_alone_at_its_factor(runs):
    short, long = runs["alone"]
    assert (short.num_prompt_tokens, long.num_prompt_tokens) == (100, 400)
    assert _all_accepted(short) and _all_accepted(long)
    assert runs["counters"]["admitted"][1] >= 3  # bucket 2: the long one alone and the two long ones mixed


def test_every_mtp_draft_is_accepted_in_a_batch_mixing_factors(runs):
    assert [r.num_prompt_tokens for r in runs["mixed"]] == [100, 400, 60, 380]
    assert all(_all_accepted(r) for r in runs["mixed"])
