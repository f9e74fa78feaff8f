"""LongRoPE per request on the real engine: short factors for short requests, long factors for long ones.

A tiny random ``Phi3ForCausalLM`` (:mod:`tests.plugin.tiny_models`: partial rotary dim 32, so 16 factors a
list) with a ``longrope`` configuration as Phi-3 ships it: original context L = 256, served context 1024,
short factors near 1, long factors up to 14.5. vLLM's compiled CPU mode, float32. Three engines:

- the plugin (``ROPESERVE_DYNAMIC_ROPE=1``, ``max_model_len`` 1024; ``generation_reserve`` 8, so that a
  240-token prompt starts short and grows);
- stock vLLM at ``max_model_len`` = L: its only table is the short-factor one (the model at its original
  context, vLLM's default for LongRoPE);
- stock vLLM at ``max_model_len`` 1024: every request gets the long factors (vLLM PR #27431).

Claims, exact (token for token, logprob for logprob) unless said: a short request equals the short engine;
a long request equals the long engine, and does not reuse the short request's cached prefix (their first
200 tokens are the same; the scale separates their cache entries); the two together in one batch equal
themselves alone within the float32 isolation tolerance (see test_engine_fidelity.py); a request that
starts short and grows past L equals the short engine up to L and, from there, a fresh request with the
long factors on the long engine (growth by recompute); the plugin's counters show tokens at both tables.
And against transformers' own per-forward LongRoPE (``Phi3ForCausalLM``, which picks the list by the
current length), each prompt's logprobs alone, short and long, within :data:`HF_TOLERANCE`.
"""

from __future__ import annotations

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.tiny_models import HEAD, L, build

pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]

ARCH = "Phi3ForCausalLM"
MAX_MODEL_LEN = 4 * L
HALF = HEAD // 4  # rotary dim 32 (partial rotary factor 0.5): 16 pairs
LONGROPE = {"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": L,
            "short_factor": [1.0 + 0.05 * i for i in range(HALF)], "long_factor": [1.0 + 0.9 * i for i in range(HALF)]}
SHORT, LONG, GROW = 200, 400, 240  # the grow prompt + 8 (the reserve) fits L; its 17th new token crosses it
NEW_TOKENS, GROW_TOKENS = 8, 40
CROSSING = L - GROW + 1  # new tokens computed before the first one past L: 16 at short, then the recompute
ISOLATION_TOLERANCE = 1e-4
HF_TOLERANCE = 1e-4  # other summation orders (vLLM CPU attention, transformers eager); measured 2.9e-6


def _overrides(**rope) -> dict:
    return {"rope_parameters": {**LONGROPE, **rope}, "max_position_embeddings": MAX_MODEL_LEN,
            "original_max_position_embeddings": L}


def _spec(folder: str, core: int, max_model_len: int, overrides: dict, **env) -> EngineSpec:
    return EngineSpec(model=folder, dtype="float32", max_model_len=max_model_len, hf_overrides=overrides,
                      kv_cache_gib=1, max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
                      extra={"enforce_eager": False, "skip_tokenizer_init": True})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build(ARCH, tmp_path_factory.mktemp("phi3") / "model"))


@pytest.fixture(scope="module")
def tokens():
    rng = random.Random("longrope")
    return [rng.randrange(512) for _ in range(LONG)]


@pytest.fixture(scope="module")
def runs(folder, tokens):
    short = Request(prompt_token_ids=tokens[:SHORT], max_tokens=NEW_TOKENS)
    long = Request(prompt_token_ids=tokens, max_tokens=NEW_TOKENS)
    grow = Request(prompt_token_ids=tokens[100:100 + GROW], max_tokens=GROW_TOKENS, cache_salt="grow")
    mixed = [dataclasses.replace(r, cache_salt="mixed") for r in (short, long)]
    prompts = [dataclasses.replace(r, max_tokens=1, prompt_logprobs=0, cache_salt="hf") for r in (short, long)]
    plugin = _spec(folder, 0, MAX_MODEL_LEN, _overrides(generation_reserve=NEW_TOKENS), ROPESERVE_DYNAMIC_ROPE="1")
    short_engine = _spec(folder, 1, L, _overrides())
    long_engine = _spec(folder, 1, MAX_MODEL_LEN, _overrides(), VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
    with ThreadPoolExecutor(2) as pool:
        plugin_run = pool.submit(run_offline, plugin, [[short], [long], mixed, [grow], [prompts[0]], [prompts[1]]],
                                 timeout=1500, counters=True)
        short_run = pool.submit(run_offline, short_engine,
                                [[short], [dataclasses.replace(grow, max_tokens=L - GROW)]], timeout=1500)
        results, counters = plugin_run.result()
        grown = results[3][0]
        fresh = Request(prompt_token_ids=grow.prompt_token_ids + grown.token_ids[:CROSSING],
                        max_tokens=GROW_TOKENS - CROSSING)  # the grown request's tokens from the recompute on
        long_run = pool.submit(run_offline, long_engine, [[long], [fresh]], timeout=1500)
        return {"plugin": results, "counters": counters, "short": short_run.result(), "long": long_run.result()}


def _exact(a, b) -> bool:
    return a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_a_short_request_equals_the_model_at_its_original_context(runs):
    plugin, stock = runs["plugin"][0][0], runs["short"][0][0]
    assert plugin.num_prompt_tokens == SHORT and _exact(plugin, stock)


def test_a_long_request_equals_stocks_long_factor_engine_and_never_reads_the_short_cache(runs):
    plugin, stock = runs["plugin"][1][0], runs["long"][0][0]
    assert plugin.num_prompt_tokens == LONG and _exact(plugin, stock)
    assert plugin.num_cached_tokens == 0  # its first 200 tokens were cached by the short request, at factor 1
    assert plugin.logprobs != runs["plugin"][0][0].logprobs  # the tables differ: a check that can fail


def test_a_short_and_a_long_request_in_one_batch_equal_themselves_alone(runs):
    alone, mixed = [runs["plugin"][0][0], runs["plugin"][1][0]], runs["plugin"][2]
    for a, m in zip(alone, mixed):
        assert m.token_ids == a.token_ids
        assert max(abs(x - y) for x, y in zip(m.logprobs, a.logprobs)) <= ISOLATION_TOLERANCE


def test_growth_across_the_switch_equals_short_then_a_fresh_long_request(runs):
    grown, short, fresh = runs["plugin"][3][0], runs["short"][1][0], runs["long"][1][0]
    assert len(grown.token_ids) == GROW_TOKENS
    assert grown.token_ids[:L - GROW] == short.token_ids and grown.logprobs[:L - GROW] == short.logprobs
    assert fresh.num_prompt_tokens == L + 1
    assert grown.token_ids[CROSSING:] == fresh.token_ids and grown.logprobs[CROSSING:] == fresh.logprobs


def test_the_counters_name_both_tables(runs):
    """Factor 1 is the short-factor table, factor 4 (= 1024 / 256) the long-factor one (the README's naming)."""
    computed = runs["counters"]["computed"]  # tokens computed at each bucket, in bucket order
    assert computed[0] > 0 and computed[1] > 0 and not any(computed[2:])
    assert runs["counters"]["grown"][:2] == [0, 1]  # one growth, into the long table


def test_each_prompt_alone_equals_transformers_per_forward_longrope(runs, folder, tokens):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    for key, value in _overrides().items():
        setattr(config, key, value)
    config.standardize_rope_params()
    model = transformers.Phi3ForCausalLM.from_pretrained(folder, config=config, torch_dtype=torch.float32).eval()
    for result, n in zip((runs["plugin"][4][0], runs["plugin"][5][0]), (SHORT, LONG)):
        ids = torch.tensor([tokens[:n]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        expected = logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
        ours = result.prompt_logprobs[1:]
        assert len(ours) == n - 1
        assert max(abs(a - b) for a, b in zip(ours, expected)) <= HF_TOLERANCE, n
