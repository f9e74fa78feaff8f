"""Speculative decoding with a drafter model, per request, on the real engine (vLLM 0.32's V1 runner, CPU).

A drafter with a model rotates the tokens it drafts with a rotary embedding of its own, in passes laid out
unlike the target's (a draft model runs one more token per request in its first pass; every drafter runs one
token per request after it). The plugin builds the drafter's rotary modules from the same parameters (the
target's own module when they match) and writes each pass's offsets from the pass's layout
(:mod:`rope_ext.vllm_plugin.runner`).

The target is the tiny Mistral of :func:`tests.plugin.tiny_models.eagle_pair`, three speculative tokens,
greedy, float32, compiled; two drafters, one engine each:

- ``draft_model``: the target itself. A draft is accepted exactly when the drafter computes what the target
  computes, at the request's scale: every draft token of every request is accepted, alone, in a batch
  mixing factors 1 and 2, and through growth: a request that starts at factor 1 and generates past L is
  recomputed at the next bucket, the drafter's cached keys with it (they are the request's blocks), so its
  drafts stay accepted after the crossing.
- ``eagle`` (vLLM's ``EagleProposer``, which MTP drafters use too): an EAGLE-1 drafter built from the target's
  own layers (it drafts the target's next token, one position shifted). Each request's acceptance (draft
  tokens, accepted tokens) equals stock vLLM's with the same drafter at the request's scale: plain RoPE short,
  static YaRN x2 long (the same checkpoints with a static ``rope_parameters``), alone and in the mixed batch.

The acceptance tests fail, alone and mixed, for both drafters, when the drafter passes' offsets are not
written (measured: the draft model then has 18 of 24 drafts accepted for a request alone; EAGLE 17 of 21
where stock has 18 of 18; with the drafter reading the target's layout, 47 % of the mixed batch's drafts).
Speculative decoding never changes greedy tokens, so each request of both also equals stock vLLM (with the
EAGLE drafter) at its scale token for token, its logprobs within :data:`TOLERANCE` (the verification pass
runs several tokens a request: other matrix shapes).

And a drafter whose checkpoint has plain RoPE, next to a dynamic target, is refused at start-up: its drafts
past the original context would be rotated unscaled.

vLLM 0.34's CPU worker without Triton (this test bed) builds the standalone CPU runner, which has no drafters
(vLLM refuses ``speculative_config`` there at config time), and the plugin refuses drafters with a model on
the runners whose passes it does not lay out (test_checks_unit.py): the module runs where the runner this
machine's worker builds has a drafter hook (0.34's V2 drafter hook is unit-tested, test_runner_hooks_unit.py).
"""

from __future__ import annotations

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.testbed import no_drafters
from tests.plugin.tiny_models import L, eagle_pair, rope_parameters, variant

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

ARCH = "MistralForCausalLM"
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
GROW = Request(prompt_token_ids=_tokens("e", 240), max_tokens=40)  # starts at factor 1, crosses L at its 17th token
ALONE = [SHORT, LONG]
MIXED = [dataclasses.replace(r, cache_salt="mixed") for r in (SHORT, LONG, SHORT_B, LONG_B)]


def _spec(model: str, core: int, method: str | None = None, draft: str | None = None, **env) -> EngineSpec:
    extra = {"enforce_eager": False, "skip_tokenizer_init": True}
    if method is not None:
        extra |= {"speculative_config": {"method": method, "model": draft,
                                         "num_speculative_tokens": SPECULATIVE_TOKENS},
                  "per_request_spec_decode_metrics": "summary"}
    return EngineSpec(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_gib=1, max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
                      extra=extra)


LOOK_AHEAD = 8  # generation_reserve: a prompt fits factor 1 while it and its next 8 tokens do
ROPES = {"dynamic": ("dynamic_yarn", 2.0, {"generation_reserve": LOOK_AHEAD}), "yarn2": ("yarn", 2.0, {})}
PLAIN = {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}, "max_position_embeddings": MAX_MODEL_LEN}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    if why := no_drafters():
        pytest.skip(why)
    root = tmp_path_factory.mktemp("drafter")
    folders = {}
    for role, base in zip(("target", "eagle"), eagle_pair(root), strict=True):
        for name, params in {"plain": PLAIN, **{k: rope_parameters(ARCH, t, f, **x) for k, (t, f, x) in ROPES.items()}}.items():
            folders[role, name] = str(variant(base, root / f"{role}-{name}", params["rope_parameters"],
                                              params["max_position_embeddings"]))
    return folders


@pytest.fixture(scope="module")
def runs(folders):
    def plugin():
        target = folders["target", "dynamic"]
        draft, counters = run_offline(_spec(target, 0, "draft_model", target), [ALONE, MIXED, [GROW]], timeout=1200,
                                      counters=True)
        eagle = run_offline(_spec(target, 0, "eagle", folders["eagle", "dynamic"]), [ALONE, MIXED], timeout=1200)
        return {"draft_model": draft, "eagle": eagle}, counters

    def stock():
        return {scale: run_offline(_spec(folders["target", scale], 1, "eagle", folders["eagle", scale]),
                                   [[r] for r in MIXED], timeout=1200)
                for scale in ("plain", "yarn2")}

    with ThreadPoolExecutor(2) as pool:
        plugin, stock = pool.submit(plugin), pool.submit(stock)
        (plugin, counters), stock = plugin.result(), stock.result()
    grown = plugin["draft_model"].pop()[0]
    # each request's oracle: stock at its scale, alone (the short ones plain, the long ones static YaRN x2)
    oracle = [stock[scale][i][0] for i, scale in enumerate(("plain", "yarn2", "plain", "yarn2"))]
    return {"plugin": {method: {"alone": alone, "mixed": mixed} for method, (alone, mixed) in plugin.items()},
            "stock": {"alone": oracle[:2], "mixed": oracle}, "unscaled long": stock["plain"][1][0],
            "grown": grown, "counters": counters}


def _assert_same_generation(result, oracle) -> None:
    assert result.token_ids == oracle.token_ids
    assert max(abs(a - b) for a, b in zip(result.logprobs, oracle.logprobs)) <= TOLERANCE


def _assert_every_draft_accepted(result) -> None:
    assert result.draft_tokens > 0
    assert result.accepted_draft_tokens == result.draft_tokens


GROUPS = ["alone", "mixed"]


@pytest.mark.parametrize("group", GROUPS)
def test_a_draft_model_equal_to_the_target_has_every_draft_accepted(runs, group):
    for result in runs["plugin"]["draft_model"][group]:
        _assert_every_draft_accepted(result)


def test_a_request_that_grows_past_l_keeps_every_draft_accepted(runs):
    """Growth by recompute rebuilds the drafter's cached keys at the new scale too (the drafter's blocks are
    the request's): a draft drafted against keys left at the old scale would be rejected."""
    grown, counters = runs["grown"], runs["counters"]
    assert len(grown.token_ids) == GROW.max_tokens and counters["grown"][1] == 1
    assert counters["past"] == [0] * len(counters["past"])
    _assert_every_draft_accepted(grown)


@pytest.mark.parametrize("group", GROUPS)
def test_an_eagle_drafter_is_accepted_as_with_stock_vllm_at_each_requests_scale(runs, group):
    for result, oracle in zip(runs["plugin"]["eagle"][group], runs["stock"][group], strict=True):
        assert result.draft_tokens > 0 and result.accepted_draft_tokens > 0
        assert (result.draft_tokens, result.accepted_draft_tokens) == (oracle.draft_tokens, oracle.accepted_draft_tokens)


@pytest.mark.parametrize("method", ["draft_model", "eagle"])
@pytest.mark.parametrize("group", GROUPS)
def test_each_request_generates_as_stock_vllm_at_its_scale(runs, method, group):
    for result, oracle in zip(runs["plugin"][method][group], runs["stock"][group], strict=True):
        _assert_same_generation(result, oracle)
    long, unscaled = runs["stock"]["alone"][1], runs["unscaled long"]
    assert long.logprobs != unscaled.logprobs  # the oracles differ: the comparison can fail


def test_a_drafter_with_plain_rope_is_refused_at_start_up(folders):
    spec = _spec(folders["target", "dynamic"], 0, "eagle", folders["eagle", "plain"])
    with pytest.raises(RuntimeError, match="has plain RoPE only"):
        run_offline(spec, [[SHORT]], timeout=600)
