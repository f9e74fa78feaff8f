"""The plugin on a multimodal-RoPE (mRoPE) model, on the real engine in vLLM's compiled CPU mode, float32.

The tiny vision-language models of :mod:`tests.plugin.tiny_models`, one engine set each: their language
models take ``[3, num_tokens]`` positions through vLLM's ``MRotaryEmbedding``. ``PaddleOCRVLForConditionalGeneration``
(chunked sections 8/12/12) and ``Qwen3VLForConditionalGeneration`` (interleaved sections, a vision tower with
deepstack features; its vLLM model file imports torchvision: it skips, saying why, where no CPU torchvision
loads). Prompts of token ids (text) and prompts with an image (8 x 8 patches, 16 image tokens whose temporal,
height and width positions differ; vLLM's and transformers' own processors). The plugin engine (dynamic
YaRN up to 4, buckets 1, 2, 4) against:

- stock vLLM with plain mRoPE: short requests (factor 1), with or without an image, equal it exactly;
- transformers' own model with static YaRN x2 (per-forward, greedy, the reference implementation): a
  400-token request (factor 2) equals it within 1e-4 per logprob, token for token; with an image, within
  2e-2: vLLM's vision tower and transformers' differ by that much with no scaling at all (stock vLLM against
  transformers' plain model, the same image: asserted too), and the wrong scale changes the tokens. The
  vision tower's own rotary embedding is not the plugin's (it is not built by ``get_rope``). Stock vLLM's static YaRN
  mRoPE is *not* the oracle here: it computes YaRN's frequency ramp over its table length, 4 x L (the
  positions factor of models that do not pass one, PaddleOCR-VL; Qwen3-VL passes 1 unless video pruning is
  on), not over L, and generates other tokens (measured in
  ``test_rotary_unit.py::test_stock_yarn_mrope_ramps_over_its_table_length``).

A mixed batch (both scales in one step) equals each request alone within the float32 isolation tolerance.
"""

from __future__ import annotations

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.tiny_models import (
    MROPE_LAYOUT,
    MROPES,
    SPECIALS,
    L,
    build,
    unloadable,
    variant,
)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

MAX_MODEL_LEN = 4 * L
NEW_TOKENS = 8
TOLERANCE = 1e-4  # float32: vLLM's kernels against transformers' eager attention; and a batch against alone
VISION_TOLERANCE = 2e-2  # vLLM's vision tower against transformers', at any scale

_rng = random.Random("mrope")
TOKENS = [_rng.randrange(len(SPECIALS[MROPES[0]]), 512) for _ in range(400)]  # no special token
SHORTS = [Request(prompt_token_ids=TOKENS[i:i + n], max_tokens=NEW_TOKENS) for i, n in enumerate((100, 240))]
LONG = Request(prompt_token_ids=TOKENS, max_tokens=NEW_TOKENS)
MIXED = [dataclasses.replace(r, cache_salt="mixed") for r in (*SHORTS, LONG)]


def _image_text(arch: str, words: int) -> str:  # the image first, then words: 18 + words tokens
    start, image, end = SPECIALS[arch][3:6]
    return f"{start}{image}{end} " + " ".join(f"w{10 + i * 7 % 490}" for i in range(words))


IMAGE_WORDS = {"short": 50, "long": 380}  # 68 tokens (factor 1) and 398 (factor 2)


def _rope(arch: str, rope_type: str, **extra) -> dict:
    return {"rope_type": rope_type, "rope_theta": 10_000.0, **MROPE_LAYOUT[arch], **extra}


def _image(path) -> str:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.RandomState(0).rand(112, 112, 3) * 255).astype("uint8")).save(path)
    return str(path)


def _spec(folder, core: int) -> EngineSpec:
    return EngineSpec(model=str(folder), dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_gib=1, max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                           "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
                      extra={"enforce_eager": False, "limit_mm_per_prompt": {"image": 1}})


def _transformers_greedy(arch: str, folder, n: int, *, tokens: list[int] | None = None, text: str | None = None,
                         image: str | None = None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from transformers' model, one full forward per token."""
    import torch
    import transformers
    from PIL import Image

    model = getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32).eval()
    if image is None:
        inputs = {"input_ids": torch.tensor([tokens])}
    else:
        processor = transformers.AutoProcessor.from_pretrained(folder)
        inputs = dict(processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt"))
    ids, out, logprobs = inputs.pop("input_ids"), [], []
    prompt_types = inputs.pop("mm_token_type_ids", None)
    inputs.pop("attention_mask", None)
    with torch.no_grad():
        for _ in range(n):
            if prompt_types is not None:  # generated tokens are text
                grown = ids.shape[1] - prompt_types.shape[1]
                inputs["mm_token_type_ids"] = torch.nn.functional.pad(prompt_types, (0, grown))
            step = torch.log_softmax(model(input_ids=ids, **inputs).logits[0, -1].float(), dim=-1)
            token = int(step.argmax())
            out.append(token)
            logprobs.append(float(step[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out, logprobs


@pytest.fixture(scope="module", params=MROPES)
def runs(request, tmp_path_factory):
    arch = request.param
    if why := unloadable(arch):
        pytest.skip(why)
    root = tmp_path_factory.mktemp("mrope")
    base = build(arch, root / "model")
    plain = variant(base, root / "plain", _rope(arch, "default"), MAX_MODEL_LEN)
    yarn2 = variant(base, root / "yarn2", _rope(arch, "yarn", factor=2.0, original_max_position_embeddings=L), L)
    dynamic = variant(base, root / "dynamic", _rope(arch, "dynamic_yarn", factor=4.0,
                                                   original_max_position_embeddings=L, buckets=[1.0, 2.0, 4.0]),
                      MAX_MODEL_LEN)
    image = _image(root / "image.png")
    texts = {k: _image_text(arch, n) for k, n in IMAGE_WORDS.items()}
    images = {k: Request(prompt=text, images=[image], max_tokens=NEW_TOKENS) for k, text in texts.items()}
    with ThreadPoolExecutor(2) as pool:
        ours = pool.submit(run_offline, _spec(dynamic, 0), [[r] for r in (*SHORTS, LONG)] + [MIXED] +
                           [[images["short"]], [images["long"]]], timeout=1200, counters=True)
        stock = pool.submit(run_offline, _spec(plain, 1), [[r] for r in (*SHORTS, images["short"])], timeout=1200)
        reference = {
            "long": _transformers_greedy(arch, yarn2, NEW_TOKENS, tokens=TOKENS),
            "image short": _transformers_greedy(arch, plain, NEW_TOKENS, text=texts["short"], image=image),
            "image long": _transformers_greedy(arch, yarn2, NEW_TOKENS, text=texts["long"], image=image)}
        (ours, counters), stock = ours.result(), stock.result()
    return {"plugin": [b[0] for b in ours[:-3]] + [ours[-3]] + [b[0] for b in ours[-2:]], "counters": counters,
            "stock": [b[0] for b in stock], "reference": reference}


def _close(a, b, tolerance: float = TOLERANCE) -> bool:
    return a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= tolerance


def _matches(result, reference: tuple[list[int], list[float]], tolerance: float) -> bool:
    tokens, logprobs = reference
    return result.token_ids == tokens and max(abs(x - y) for x, y in zip(result.logprobs, logprobs)) <= tolerance


def test_short_requests_equal_the_unscaled_model(runs):
    ours = runs["plugin"][:len(SHORTS)] + [runs["plugin"][-2]]  # and the short one with an image
    for result, stock in zip(ours, runs["stock"], strict=True):
        assert result.token_ids == stock.token_ids and result.logprobs == stock.logprobs


def test_a_long_request_equals_transformers_static_yarn_at_its_factor(runs):
    ours = runs["plugin"][len(SHORTS)]
    assert ours.num_prompt_tokens == len(TOKENS) and _matches(ours, runs["reference"]["long"], TOLERANCE)
    assert runs["counters"]["admitted"][1] >= 2  # at bucket 2: this one and the long one with an image
    assert ours.logprobs != runs["plugin"][0].logprobs


def test_a_long_request_with_an_image_equals_transformers_static_yarn_at_its_factor(runs):
    short, long = runs["plugin"][-2:]
    assert (short.num_prompt_tokens, long.num_prompt_tokens) == (68, 398)
    # vLLM's vision tower against transformers', unscaled: the tolerance this comparison needs
    assert _matches(runs["stock"][-1], runs["reference"]["image short"], VISION_TOLERANCE)
    assert _matches(long, runs["reference"]["image long"], VISION_TOLERANCE)


def test_each_request_in_a_mixed_batch_equals_itself_alone(runs):
    alone, mixed = runs["plugin"][:len(SHORTS) + 1], runs["plugin"][len(SHORTS) + 1]
    assert all(_close(m, a) for m, a in zip(mixed, alone, strict=True))
