"""The plugin's promises, checked on the real engine (vLLM CPU, default model, float32), in vLLM's default
compiled mode (no ``enforce_eager``: ``DYNAMO_TRACE_ONCE`` with inductor on CPU, so the rotary embedding is
the traced ``forward_native``).

Three engines, each started once for the module, all with the same settings (max_model_len 32768,
float32, compiled) so that one request run alone goes through identical steps in each, and equality is
exact, to the last logprob. The original context is declared L = 4096 (``original_max_position_embeddings``,
half the model's 8192) so that the prompts past L cost a quarter of the attention; the default model at
its own L is served end to end in tests/e2e.

- stock vLLM with plain RoPE (``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``): the oracle for the short prompts;
- stock vLLM with static YaRN at factor sqrt(2): the oracle for the long prompt (5000 + 8 tokens -> the
  first bucket past L, sqrt(2), of the default buckets sqrt(2) apart);
- vLLM with the plugin (dynamic YaRN up to 8 x 4096): each prompt alone; then all of them submitted
  together; then one short prompt forced to factor 2 (its factor-1 blocks are in the prefix cache);
  then the long prompt again (its blocks are reusable at the same scale); then decode batches whose mix of
  scales changes from step to step: requests at factors 1, 2 and 4 (forced) with prompts of different
  lengths (so chunked prefill lets them join at different steps) and different numbers of new tokens (so
  they finish at different steps), each compared with itself alone. That is the case that breaks a
  captured graph if any per-step input is a fresh tensor instead of a buffer updated in place: a request
  read at another request's factor moves its logprobs by 1e-2 or more.

Requests submitted together reach the engine core one by one, so which of them share a step depends on
timing, and stock vLLM CPU is not bitwise invariant to that even in float32 (measured: |logprob
difference| about 5e-6 for a 6000-token prompt run alone and next to others; 2e-6 in the changing decode
batches even with the CPU attention's batch-dependent split-KV turned off: matrix products round
differently with the number of rows in a step). Results among others are therefore compared
with the ISOLATION_TOLERANCE; everything else exactly. Two engines run at a time, each bound to its own
core. About five minutes on two cores.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest

from rope_ext import default_buckets
from server.offline import EngineSpec, Request, run_offline

pytestmark = pytest.mark.engine

L = 4096  # declared below the model's 8192: see the module's docstring
MAX_MODEL_LEN = 8 * L
SHORT_LENGTHS = (256, 1000, 3000)  # + 8 new tokens <= L: factor 1
LONG_LENGTH = 5000  # + 8 new tokens: factor sqrt(2) (past L; capacity 5792)
LONG_FACTOR = 2 ** 0.5
NEW_TOKENS = 8
ROPE_THETA = 100000.0
ISOLATION_TOLERANCE = 1e-4  # max |logprob difference| of a request alone vs among others (float32)

PLUGIN = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": ROPE_THETA, "factor": 8.0,
                              "original_max_position_embeddings": L}}
STATIC_YARN_LONG = {"rope_parameters": {"rope_type": "yarn", "rope_theta": ROPE_THETA, "factor": LONG_FACTOR,
                                        "original_max_position_embeddings": L},
                    "max_position_embeddings": MAX_MODEL_LEN}


def _spec(model_dir: str, core: int, hf_overrides=None, **env) -> EngineSpec:
    return EngineSpec(model=model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, hf_overrides=hf_overrides,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), **env},
                      extra={"enforce_eager": False})


# Changing decode batches: (prompt length, forced factor, new tokens); prompts from another part of the book.
CHANGING = ((2000, 1, 6), (1000, 2, 14), (200, 4, 10), (500, 2, 4))


def _close(a, b) -> bool:
    return a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= ISOLATION_TOLERANCE


@pytest.fixture(scope="module")
def runs(model_dir, book_tokens):
    shorts = [Request(prompt_token_ids=book_tokens[1000 * i:1000 * i + n], max_tokens=NEW_TOKENS)
              for i, n in enumerate(SHORT_LENGTHS)]
    long = Request(prompt_token_ids=book_tokens[20000:20000 + LONG_LENGTH], max_tokens=NEW_TOKENS)
    # A fresh salt keeps the mixed batch away from the blocks the lone runs left in the prefix cache.
    mixed = [dataclasses.replace(r, cache_salt="mixed") for r in shorts + [long]]
    short_at_2 = dataclasses.replace(shorts[1], extra_args={"rope_factor": 2})
    changing = [Request(prompt_token_ids=book_tokens[40000 + 4000 * i:40000 + 4000 * i + n], max_tokens=new,
                        extra_args={"rope_factor": f}, cache_salt="changing") for i, (n, f, new) in enumerate(CHANGING)]
    changing_alone = [[dataclasses.replace(r, cache_salt=f"alone-{i}")] for i, r in enumerate(changing)]
    with ThreadPoolExecutor(2) as pool:
        plugin = pool.submit(run_offline, _spec(model_dir, 0, PLUGIN),
                             [[r] for r in shorts + [long]] + [mixed, [short_at_2], [long], changing, *changing_alone],
                             counters=True)
        (*stock_alone,) = pool.submit(run_offline, _spec(model_dir, 1, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1"),
                                      [[r] for r in shorts]).result()
        (yarn_alone,) = pool.submit(run_offline, _spec(model_dir, 1, STATIC_YARN_LONG), [[long]]).result()
        results, counters = plugin.result()
    plugin_alone, (plugin_mixed, plugin_short_at_2, plugin_long_again, plugin_changing) = results[:4], results[4:8]
    return {
        "stock": [b[0] for b in stock_alone], "yarn2_long": yarn_alone[0],
        "plugin": [b[0] for b in plugin_alone], "plugin_mixed": plugin_mixed,
        "plugin_short_at_2": plugin_short_at_2[0], "plugin_long_again": plugin_long_again[0],
        "changing": plugin_changing, "changing_alone": [b[0] for b in results[8:]], "counters": counters,
    }


@pytest.mark.parametrize("index", range(len(SHORT_LENGTHS)), ids=[f"{n}tok" for n in SHORT_LENGTHS])
def test_short_requests_equal_the_unscaled_model(runs, index):
    plugin, stock = runs["plugin"][index], runs["stock"][index]
    assert plugin.num_prompt_tokens == SHORT_LENGTHS[index]
    assert plugin.token_ids == stock.token_ids
    assert plugin.logprobs == stock.logprobs  # exact


def test_long_request_equals_static_yarn_at_its_factor(runs):
    plugin, oracle = runs["plugin"][-1], runs["yarn2_long"]
    assert plugin.num_prompt_tokens == LONG_LENGTH
    assert plugin.token_ids == oracle.token_ids
    assert plugin.logprobs == oracle.logprobs  # exact


@pytest.mark.parametrize("index", range(len(SHORT_LENGTHS) + 1))
def test_each_request_in_a_mixed_batch_equals_itself_alone(runs, index):
    batched, alone = runs["plugin_mixed"][index], runs["plugin"][index]
    assert batched.num_cached_tokens == 0
    assert _close(batched, alone)


def test_short_requests_in_a_mixed_batch_stay_unscaled(runs):
    for batched, stock in zip(runs["plugin_mixed"], runs["stock"]):
        assert _close(batched, stock)


def test_prefix_cache_is_never_shared_across_scales(runs):
    # The 1000-token prompt ran first at factor 1 (its blocks are cached), then forced to factor 2.
    at_1, at_2 = runs["plugin"][1], runs["plugin_short_at_2"]
    assert at_2.num_cached_tokens == 0
    assert at_2.logprobs != at_1.logprobs


def test_prefix_cache_is_reused_at_the_same_scale(runs):
    again = runs["plugin_long_again"]
    assert again.num_cached_tokens >= LONG_LENGTH - 128  # every full block (128 tokens on CPU) of the prompt
    assert again.token_ids == runs["plugin"][-1].token_ids


@pytest.mark.parametrize("index", range(len(CHANGING)), ids=[f"{n}tok-x{f}-{new}new" for n, f, new in CHANGING])
def test_decode_batches_whose_scales_change_give_each_request_what_it_gives_alone(runs, index):
    together, alone = runs["changing"][index], runs["changing_alone"][index]
    assert len(together.token_ids) == CHANGING[index][2]
    assert _close(together, alone)


def test_every_scheduled_token_was_computed_at_its_factor(runs):
    """The engine's own evidence (the counters behind ropeserve_engine_rope_*): the workers wrote offsets
    for every token the scheduler scheduled, at the same factors, factor 4 included."""
    counters = runs["counters"]
    assert counters["computed"] == counters["scheduled"]
    at_4 = counters["computed"][default_buckets(8.0).index(4.0)]  # the default buckets, sqrt(2) apart
    assert at_4 == 2 * (200 + 10 - 1)  # the factor-4 request, together and alone (its last token is never fed)
