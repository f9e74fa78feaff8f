"""The plugin's promise on hybrid models (Qwen3-Next, Qwen3.5 dense and MoE), on the real engine.

The tiny hybrid models of :mod:`tests.plugin.tiny_models`, one engine set each: Gated DeltaNet
(linear-attention) layers with no RoPE, each after a gated full-attention layer with a partial rotary
dimension (16 of 64): ``Qwen3NextForCausalLM`` (plain partial RoPE, MoE MLPs), and Qwen3.5's
``Qwen3_5ForConditionalGeneration`` (dense) and ``Qwen3_5MoeForConditionalGeneration`` served text-only
(``language_model_only``: vLLM keeps their interleaved partial mRoPE, sections [3, 3, 2] of the rotary half,
so the plugin's mRoPE module runs, three equal position rows for text). Their vLLM model files import
torchvision: the Qwen3.5 ones skip, saying why, where no CPU torchvision loads (``tiny_models.unloadable``).
vLLM CPU's Gated DeltaNet runs in bfloat16 only ("CPU GDN attention requires BF16"), so everything here is
bfloat16, in vLLM's compiled CPU mode; stock vLLM is deterministic for one request alone, so the plugin's
requests are asserted *exactly* equal to stock engines running the same request alone:

- short requests (factor 1) equal stock vLLM with plain RoPE; a 400-token one (factor 2) equals stock static
  YaRN x2;
- growth by recompute: a request that starts at factor 1 and generates past L recomputes at factor 2, and
  every token after the crossing equals a fresh request of the same tokens on the static YaRN x2 engine. The
  linear-attention state of the second DeltaNet layer depends on the scale (its input is the full-attention
  layer's output), so this holds only if the recompute rebuilds that state too; the same tokens continued at
  factor 1 (stock, plain RoPE) differ, so the comparison can fail;
- prefix caching in vLLM's hybrid mode (``mamba_cache_mode`` ``align``: the DeltaNet state is cached at block
  boundaries beside the KV blocks; vLLM makes the block 256 tokens here, so that an attention page holds a
  DeltaNet state): requests sharing a 300-token system prompt, at factor 2 by their length or asking for 4, hit
  the cache (its first block) only at their own scale, and each equals itself computed alone (another cache
  salt). (A prefill caches the DeltaNet state at its last block boundary only, so the requests are kept under
  two blocks: a longer one would leave no state at the system prompt's block to share.)

One plugin engine, then the two stock engines side by side (one core each), in-process engine cores
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) as in test_engine_architectures.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.testbed import no_hybrid_kernels
from tests.plugin.tiny_models import (
    HYBRIDS,
    QWEN35,
    QWEN35_MOE,
    L,
    build,
    describe,
    rope_parameters,
    unloadable,
    variant,
)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

MAX_MODEL_LEN = 4 * L
NEW_TOKENS = 8
LOOK_AHEAD = 8  # generation_reserve: a prompt fits bucket 1 while it and its next 8 tokens do
GROW_PROMPT, GROW_TOKENS = 240, 40  # starts at 1, crosses L = 256 at its 17th token
BLOCK = 256  # the hybrid cache's block: vLLM grows the attention block until a page holds a DeltaNet state
SYSTEM = 300


def _spec(model, core: int, **env) -> EngineSpec:
    extra = {"enforce_eager": False, "skip_tokenizer_init": True}
    if describe(model) in (QWEN35, QWEN35_MOE):  # Qwen3.5 text-only: its language model, mRoPE kept
        extra["language_model_only"] = True
    return EngineSpec(model=str(model), dtype="bfloat16", max_model_len=MAX_MODEL_LEN, kv_cache_gib=1,
                      max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
                      extra=extra)


def _tokens(seed: str, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


TOKENS = _tokens("hybrid", 400)
SHORT = Request(prompt_token_ids=TOKENS[:100], max_tokens=NEW_TOKENS)
LONG = Request(prompt_token_ids=TOKENS, max_tokens=NEW_TOKENS)
GROW = Request(prompt_token_ids=TOKENS[:GROW_PROMPT], max_tokens=GROW_TOKENS)
_system = _tokens("system", SYSTEM)
# Four requests after one system prompt, one at a time, at factors 2, 4, 2, 4 (the second and fourth ask for 4).
SHARED = [Request(prompt_token_ids=_system + _tokens(f"user {i}", n), max_tokens=NEW_TOKENS,
                  extra_args={"rope_factor": 4} if i % 2 else None) for i, n in enumerate((20, 40, 30, 50))]
ALONE = [dataclasses.replace(r, cache_salt=f"alone {i}") for i, r in enumerate(SHARED)]


@pytest.fixture(scope="module", params=HYBRIDS)
def runs(request, tmp_path_factory):
    arch = request.param
    if why := no_hybrid_kernels() or unloadable(arch):
        pytest.skip(why)
    root = tmp_path_factory.mktemp("hybrid")
    base = build(arch, root / "model")
    config = json.loads((base / "config.json").read_text())

    def rope(name: str, params: dict) -> Path:  # the RoPE parameters in the (text) config the engine reads
        return variant(base, root / name, params["rope_parameters"], params["max_position_embeddings"])

    folder = rope("dynamic", rope_parameters(arch, "dynamic_yarn", 4.0, generation_reserve=LOOK_AHEAD,
                                             growth="recompute", buckets=[1.0, 2.0, 4.0]))
    batches = [[SHORT], [LONG], [GROW], *[[r] for r in (*SHARED, *ALONE)]]
    plugin, counters = run_offline(_spec(folder, 0), batches, timeout=1200, counters=True)
    grown = plugin[2][0]
    crossing = L - GROW_PROMPT + 1  # the first token generated at a length past L, hence at factor 2
    fresh = Request(prompt_token_ids=GROW.prompt_token_ids + grown.token_ids[:crossing],
                    max_tokens=GROW_TOKENS - crossing)
    plain = config.get("text_config", config)["rope_parameters"]
    stock = _spec(rope("plain", {"rope_parameters": plain, "max_position_embeddings": MAX_MODEL_LEN}), 0,
                  VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
    yarn2 = _spec(rope("yarn2", rope_parameters(arch, "yarn", 2.0) | {"max_position_embeddings": MAX_MODEL_LEN}), 1)
    continued = dataclasses.replace(fresh, max_tokens=1)
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(run_offline, stock, [[SHORT], [continued]], timeout=1200)
        static = pool.submit(run_offline, yarn2, [[LONG], [fresh]], timeout=1200)
        plain, static = plain.result(), static.result()
    return {"plugin": [b[0] for b in plugin], "counters": counters, "crossing": crossing,
            "plain": [b[0] for b in plain], "yarn2": [b[0] for b in static]}


def _exact(a, b) -> bool:
    return a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_a_short_request_equals_the_unscaled_model(runs):
    assert _exact(runs["plugin"][0], runs["plain"][0])


def test_a_long_request_equals_static_yarn_at_its_factor(runs):
    plugin, yarn = runs["plugin"][1], runs["yarn2"][0]
    assert plugin.num_prompt_tokens == len(TOKENS) and _exact(plugin, yarn)
    assert plugin.logprobs != runs["plugin"][0].logprobs


def test_growth_recomputes_the_linear_attention_state_at_the_new_scale(runs):
    grown, fresh, crossing = runs["plugin"][2], runs["yarn2"][1], runs["crossing"]
    assert len(grown.token_ids) == GROW_TOKENS
    assert grown.token_ids[crossing:] == fresh.token_ids
    assert grown.logprobs[crossing:] == fresh.logprobs
    # the grown request and every token it computed: bucket 1 for the prompt, bucket 2 after the crossing
    counters = runs["counters"]
    assert counters["grown"][1] == 1 and counters["past"] == [0] * len(counters["past"])
    # the first token after the crossing at factor 1 (the state carried over, not rebuilt) is another one
    assert runs["plain"][1].logprobs[0] != fresh.logprobs[0]


def test_the_hybrid_prefix_cache_is_shared_only_within_a_scale(runs):
    shared = runs["plugin"][3:3 + len(SHARED)]
    assert [r.num_prompt_tokens for r in shared] == [len(r.prompt_token_ids) for r in SHARED]
    # the first at factor 4 does not read the factor-2 request's cached block; the second of each scale does
    assert [r.num_cached_tokens for r in shared] == [0, 0, BLOCK, BLOCK]
    counters = runs["counters"]
    assert counters["admitted"][1] >= 2 and counters["admitted"][2] >= 2  # buckets 2 and 4


def test_each_request_sharing_a_system_prompt_equals_itself_alone(runs):
    shared, alone = runs["plugin"][3:3 + len(SHARED)], runs["plugin"][3 + len(SHARED):]
    assert [r.num_cached_tokens for r in alone] == [0] * len(ALONE)
    assert all(_exact(s, a) for s, a in zip(shared, alone))
    assert shared[1].logprobs != shared[0].logprobs
