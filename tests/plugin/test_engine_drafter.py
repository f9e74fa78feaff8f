"""Speculative decoding with a draft model, per request, on the real engine (vLLM 0.32's V1 runner, CPU).

A drafter with a model rotates the tokens it drafts with a rotary embedding of its own, in passes laid out
unlike the target's (a draft model runs one more token per request in its first pass, then one token per
request). The plugin builds the drafter's rotary modules from the same parameters (the target's own module
when they match) and writes each pass's offsets from the pass's layout (:mod:`rope_ext.vllm_plugin.runner`).

The drafter here is the target itself (the tiny ``Qwen3ForCausalLM`` of :mod:`tests.plugin.tiny_models`,
``method: draft_model``, three speculative tokens, greedy), so a draft is accepted exactly when the drafter
computes what the target computes: at the request's scale. Acceptance is therefore the measure: every draft
token of every request is accepted, alone and in a batch mixing factors 1 and 2. (Measured with the drafter
hook removed, the drafter reading the target's layout: 47 % of the mixed batch's drafts accepted, against
100 % with it.) Speculative decoding never changes greedy tokens, so each request also equals, token for
token, stock vLLM without speculation at its scale (plain RoPE short, static YaRN x2 long), its logprobs
within :data:`TOLERANCE` (the target verifies 4 tokens per step instead of 1: other matrix shapes).

And a drafter whose checkpoint has plain RoPE, next to a dynamic target, is refused at start-up: its drafts
past the original context would be rotated unscaled.

vLLM 0.34's CPU runner has no drafters (``StandaloneCPUModelRunner.get_draft_model`` returns None), and the
plugin refuses drafters with a model on the runners whose passes it does not lay out
(test_checks_unit.py): the module runs where the installed vLLM's runners have a drafter hook.
"""

from __future__ import annotations

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.tiny_models import L, build, rope_parameters, variant

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

ARCH = "Qwen3ForCausalLM"
MAX_MODEL_LEN = 2 * L
SPECULATIVE_TOKENS = 3
NEW_TOKENS = 24
TOLERANCE = 1e-4  # float32, a request's logprobs with and without speculation (the isolation tolerance)


def _tokens(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


# With the default buckets (1, 1.41, 2): the short prompts (and their 8-token reserve) fit L, the long ones
# need factor 2 (over 1.41 x 256 = 362 tokens).
SHORT, SHORT_B = (Request(prompt_token_ids=_tokens(s, n), max_tokens=NEW_TOKENS) for s, n in (("a", 100), ("b", 60)))
LONG, LONG_B = (Request(prompt_token_ids=_tokens(s, n), max_tokens=NEW_TOKENS) for s, n in (("c", 400), ("d", 380)))
MIXED = [dataclasses.replace(r, cache_salt="mixed") for r in (SHORT, LONG, SHORT_B, LONG_B)]


def _spec(model: str, core: int, draft: str | None = None, hf_overrides=None, **env) -> EngineSpec:
    extra = {"enforce_eager": False, "skip_tokenizer_init": True}
    if draft is not None:
        extra |= {"speculative_config": {"method": "draft_model", "model": draft,
                                         "num_speculative_tokens": SPECULATIVE_TOKENS},
                  "per_request_spec_decode_metrics": "summary"}
    return EngineSpec(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, hf_overrides=hf_overrides,
                      kv_cache_gib=1, max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
                      extra=extra)


def _drafters_hooked() -> bool:
    from rope_ext.vllm_plugin.versions import adapter

    return any(hook.drafter is not None for hook in adapter().RUNNERS)


def _folder(base, name: str, rope_type: str, factor: float):
    params = rope_parameters(ARCH, rope_type, factor)
    return str(variant(base, base.parent / name, params["rope_parameters"], params["max_position_embeddings"]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    if not _drafters_hooked():
        pytest.skip("no runner of this vLLM runs a drafter with a model that the plugin hooks (vLLM 0.34's CPU "
                    "runner has no drafters)")
    base = build(ARCH, tmp_path_factory.mktemp("drafter") / "model")
    return {"base": str(base), "dynamic": _folder(base, "dynamic", "dynamic_yarn", 2.0),
            "plain": _folder(base, "plain", "default", 1.0)}


@pytest.fixture(scope="module")
def runs(folders):
    dynamic, base = folders["dynamic"], folders["base"]
    plain = _spec(base, 1, hf_overrides={"max_position_embeddings": MAX_MODEL_LEN}, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
    yarn2 = _spec(base, 1, hf_overrides=rope_parameters(ARCH, "yarn", 2.0))
    with ThreadPoolExecutor(2) as pool:
        plugin = pool.submit(run_offline, _spec(dynamic, 0, draft=dynamic), [[SHORT], [LONG], MIXED], timeout=1200)
        stock = [run_offline(plain, [[SHORT], [SHORT_B]], timeout=1200),
                 run_offline(yarn2, [[LONG], [LONG_B]], timeout=1200)]
        plugin = plugin.result()
    (short, short_b), (long, long_b) = ([b[0] for b in s] for s in stock)
    return {"alone": [plugin[0][0], plugin[1][0]], "mixed": plugin[2],
            "stock": {"alone": [short, long], "mixed": [short, long, short_b, long_b]}}


def _assert_same_generation(result, oracle) -> None:
    assert result.token_ids == oracle.token_ids
    assert max(abs(a - b) for a, b in zip(result.logprobs, oracle.logprobs)) <= TOLERANCE


def _assert_every_draft_accepted(result) -> None:
    assert result.draft_tokens > 0
    assert result.accepted_draft_tokens == result.draft_tokens


@pytest.mark.parametrize("group", ["alone", "mixed"])
def test_every_draft_is_accepted_at_each_requests_scale(runs, group):
    for result in runs[group]:
        _assert_every_draft_accepted(result)


@pytest.mark.parametrize("group", ["alone", "mixed"])
def test_each_request_generates_as_stock_vllm_at_its_scale(runs, group):
    for result, oracle in zip(runs[group], runs["stock"][group], strict=True):
        _assert_same_generation(result, oracle)
    short, long = runs["stock"]["alone"]
    assert short.logprobs != long.logprobs  # the oracles differ: the comparison can fail


def test_a_drafter_with_plain_rope_is_refused_at_start_up(folders):
    with pytest.raises(RuntimeError, match="has plain RoPE only"):
        run_offline(_spec(folders["dynamic"], 0, draft=folders["plain"]), [[SHORT]], timeout=600)
