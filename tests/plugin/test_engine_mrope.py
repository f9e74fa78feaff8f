"""The plugin on a multimodal-RoPE (mRoPE) model, on the real engine in vLLM's compiled CPU mode, float32.

The tiny ``PaddleOCRVLForConditionalGeneration`` of :mod:`tests.plugin.tiny_models` (its language model
takes ``[3, num_tokens]`` positions through vLLM's ``MRotaryEmbedding``; the one mRoPE family whose vLLM
model file loads without torchvision, which the Qwen3-VL and Qwen3.5 files need and the test bed lacks),
served text-only (``limit_mm_per_prompt`` image 0; an image grid's positions are covered token by token in
``test_rotary_unit.py``). The plugin engine (dynamic YaRN up to 4, buckets 1, 2, 4) against:

- stock vLLM with plain mRoPE: short requests (factor 1) equal it exactly;
- transformers' own model with static YaRN x2 (per-forward, greedy, the reference implementation): a
  400-token request (factor 2) equals it within 1e-4 per logprob, token for token. Stock vLLM's static YaRN
  mRoPE is *not* the oracle here: it computes YaRN's frequency ramp over its table length, 4 x L (the
  positions factor of models that do not pass one), not over L, and generates other tokens (measured in
  ``test_rotary_unit.py::test_stock_yarn_mrope_ramps_over_its_table_length``).

A mixed batch (both scales in one step) equals each request alone within the float32 isolation tolerance.
"""

from __future__ import annotations

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.tiny_models import MROPE, MROPE_SECTION, L, build, variant

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

MAX_MODEL_LEN = 4 * L
NEW_TOKENS = 8
TOLERANCE = 1e-4  # float32: vLLM's kernels against transformers' eager attention; and a batch against alone

_rng = random.Random("mrope")
TOKENS = [_rng.randrange(3, 512) for _ in range(400)]
SHORTS = [Request(prompt_token_ids=TOKENS[i:i + n], max_tokens=NEW_TOKENS) for i, n in enumerate((100, 240))]
LONG = Request(prompt_token_ids=TOKENS, max_tokens=NEW_TOKENS)
MIXED = [dataclasses.replace(r, cache_salt="mixed") for r in (*SHORTS, LONG)]


def _rope(rope_type: str, **extra) -> dict:
    return {"rope_type": rope_type, "rope_theta": 10_000.0, "mrope_section": MROPE_SECTION, **extra}


def _spec(folder, core: int) -> EngineSpec:
    return EngineSpec(model=str(folder), dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_gib=1, max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                           "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
                      extra={"enforce_eager": False, "skip_tokenizer_init": True,
                             "limit_mm_per_prompt": {"image": 0}})


def _transformers_greedy(folder, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
    import torch
    import transformers

    model = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ids, out, logprobs = torch.tensor([tokens]), [], []
    with torch.no_grad():
        for _ in range(n):
            step = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
            token = int(step.argmax())
            out.append(token)
            logprobs.append(float(step[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out, logprobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mrope")
    base = build(MROPE, root / "model")
    plain = variant(base, root / "plain", _rope("default"), MAX_MODEL_LEN)
    yarn2 = variant(base, root / "yarn2", _rope("yarn", factor=2.0, original_max_position_embeddings=L), L)
    dynamic = variant(base, root / "dynamic", _rope("dynamic_yarn", factor=4.0, original_max_position_embeddings=L,
                                                   buckets=[1.0, 2.0, 4.0]), MAX_MODEL_LEN)
    with ThreadPoolExecutor(2) as pool:
        ours = pool.submit(run_offline, _spec(dynamic, 0), [[r] for r in (*SHORTS, LONG)] + [MIXED], timeout=1200,
                           counters=True)
        stock = pool.submit(run_offline, _spec(plain, 1), [[r] for r in SHORTS], timeout=1200)
        reference = _transformers_greedy(yarn2, TOKENS, NEW_TOKENS)
        (ours, counters), stock = ours.result(), stock.result()
    return {"plugin": ours, "counters": counters, "stock": [b[0] for b in stock], "reference": reference}


def _close(a, b) -> bool:
    return a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= TOLERANCE


def test_short_requests_equal_the_unscaled_model(runs):
    for ours, stock in zip(runs["plugin"], runs["stock"]):
        assert ours[0].token_ids == stock.token_ids and ours[0].logprobs == stock.logprobs


def test_a_long_request_equals_transformers_static_yarn_at_its_factor(runs):
    ours = runs["plugin"][len(SHORTS)][0]
    tokens, logprobs = runs["reference"]
    assert ours.num_prompt_tokens == len(TOKENS) and ours.token_ids == tokens
    assert max(abs(x - y) for x, y in zip(ours.logprobs, logprobs)) <= TOLERANCE
    assert runs["counters"]["admitted"][1] >= 1  # at bucket 2
    unscaled = runs["plugin"][0][0]
    assert ours.logprobs != unscaled.logprobs


def test_each_request_in_a_mixed_batch_equals_itself_alone(runs):
    alone, mixed = [b[0] for b in runs["plugin"][:-1]], runs["plugin"][-1]
    assert all(_close(m, a) for m, a in zip(mixed, alone))
