"""Growth in the model runner (rope_ext.vllm_plugin.regrow), on vLLM's real CPU attention code, no engine.

- KeySlots: the key layout probed through ``CPUAttentionBackendImpl.do_kv_cache_update`` finds every key
  that backend wrote, for each CPU ISA layout (vec, vec16, amx), dtype, block size and head size.
- Regrower.rerotate: a request's keys, spread over shuffled blocks with a partial last block, are
  converted in every layer (as the torch fast path converts them, within one ulp), through the strided
  view (vec) and the element-wise gather (amx); its values, other blocks and the unwritten tail of its
  last block are left bit for bit.
- Regrower.apply: the requests the scheduler grew (tests/plugin/test_scheduler_unit.py decides) get
  their cached keys converted, once each.
"""

from __future__ import annotations

import types

import pytest
import torch

from rope_ext import RopeScaling
from rope_ext.rerotate import delta_rows, rerotate, rotate_keys

pytest.importorskip("vllm")


def _rerotate_runs_here() -> bool:
    from rope_ext.vllm_plugin.versions import adapter

    return any(hook.rerotate for hook in adapter().RUNNERS)


if not _rerotate_runs_here():
    pytest.skip("growth 'rerotate' runs on vLLM 0.32's V1 runner only; this vLLM refuses it at start-up "
                "(tests/plugin/test_checks_unit.py)", allow_module_level=True)

HEADS = 3
NUM_BLOCKS = 8


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()) as config:
        yield config


def _layer(head_size: int, isa: str):
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    # The real class and its real do_kv_cache_update; __init__ wants a whole model config, and
    # do_kv_cache_update reads only these two attributes.
    impl = object.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    return types.SimpleNamespace(impl=impl, num_kv_heads=HEADS, head_size=head_size, isa=isa,
                                 _k_scale_float=1.0, _v_scale_float=1.0)


def _cache(block_size: int, head_size: int, dtype) -> torch.Tensor:
    # The CPU backend's shape: [num_blocks, num_kv_heads, block_size, 2 * head_size]
    return torch.zeros(NUM_BLOCKS, HEADS, block_size, 2 * head_size, dtype=dtype)


def _write(layer, cache, keys, values, block_ids, block_size) -> None:
    j = torch.arange(keys.shape[0])
    slots = torch.tensor(block_ids)[j // block_size] * block_size + j % block_size
    layer.impl.do_kv_cache_update(layer, keys, values, cache, slots)


LAYOUTS = [(isa, dtype, bs, hs) for isa in ("vec", "vec16", "amx") for dtype in (torch.float32, torch.bfloat16)
           for bs, hs in ((128, 64), (32, 128))]


@pytest.mark.parametrize(("isa", "dtype", "block_size", "head_size"), LAYOUTS,
                         ids=[f"{i}-{str(d)[6:]}-bs{b}-h{h}" for i, d, b, h in LAYOUTS])
def test_probed_slots_find_every_key_the_backend_wrote(vllm_config, isa, dtype, block_size, head_size):
    from rope_ext.vllm_plugin.regrow import KeySlots

    layer, cache = _layer(head_size, isa), _cache(block_size, head_size, dtype)
    slots = KeySlots.probe(layer, cache, block_dim=0)
    assert slots.block_size == block_size and slots.block_stride == cache.stride(0)
    n, block_ids = 2 * block_size + 5, [5, 2, 7]
    keys = torch.randn(n, HEADS, head_size).to(dtype)
    _write(layer, cache, keys, -keys, block_ids, block_size)
    ids = torch.tensor(block_ids)
    found = cache.view(-1)[slots.token_offsets(ids, n)]
    assert torch.equal(found, keys.reshape(n, -1))
    assert (slots.strides is not None) == (isa != "amx")  # vec layouts are a strided view, amx panels not
    blocks = slots.gather(cache, ids)
    assert torch.equal(blocks[:n], keys.reshape(n, -1))
    before = cache.clone()
    slots.scatter(cache, ids, blocks)
    assert torch.equal(cache, before)
    blocks[:n] = -blocks[:n]
    slots.scatter(cache, ids, blocks)
    changed = torch.zeros(cache.numel(), dtype=torch.bool)
    changed[slots.token_offsets(ids, n).reshape(-1)] = True
    assert torch.equal(cache.view(-1)[changed], -before.view(-1)[changed])
    assert torch.equal(cache.view(-1)[~changed], before.view(-1)[~changed])


@pytest.fixture(scope="module")
def rotary(vllm_config):
    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

    scaling = RopeScaling(method="dynamic_yarn", original_max_position=200, max_factor=4.0, growth="rerotate")
    return PerRequestRotaryEmbedding(64, 64, 1e5, True, torch.float32, scaling=scaling,
                                     rows_per_bucket=scaling.max_context, max_num_tokens=1024)


def _two_layers(dtype):
    from rope_ext.vllm_plugin.regrow import KeySlots, Regrower, _Layer

    layers = []
    for i, isa in enumerate(("vec", "amx")):
        layer, cache = _layer(64, isa), _cache(32, 64, dtype)
        layers.append((layer, _Layer(f"layer.{i}", cache, 0, KeySlots.probe(layer, cache, 0))))
    return layers, Regrower


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rerotate_converts_the_request_keys_in_every_layer_and_nothing_else(rotary, dtype):
    layers, regrower_cls = _two_layers(dtype)
    n, block_ids = 70, [6, 1, 3]  # 32-token blocks: the last one holds 6 of the request's tokens
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(NUM_BLOCKS * 32, HEADS, 64, generator=generator).to(dtype) for _ in layers]
    requests_keys = []
    for (layer, state), fill in zip(layers, noise):
        _write(layer, state.kv_cache, fill, fill, list(range(NUM_BLOCKS)), 32)  # every slot holds something
        keys = torch.randn(n, HEADS, 64, generator=generator).to(dtype)
        _write(layer, state.kv_cache, keys, keys + 1, block_ids, 32)
        requests_keys.append(keys)
    before = [state.kv_cache.clone() for _, state in layers]
    regrower = regrower_cls(rotary, [state for _, state in layers])
    regrower.rerotate((block_ids,), n, 1.0, 4.0)
    delta = delta_rows(rotary.cos_sin_cache[:n], rotary.cos_sin_cache[rotary.row_offset(4.0):][:n])
    for (_, state), keys, old in zip(layers, requests_keys, before):
        where = state.slots.token_offsets(torch.tensor(block_ids), n)
        expected = rerotate(keys.reshape(n, -1), torch.arange(n), delta, head_size=64)
        got = state.kv_cache.view(-1)[where]
        # vLLM's kernel and the torch fast path: both float32, one rounding to the cache dtype (at most
        # one float32 ulp apart before it, so equal or one ulp of the cache dtype apart after it).
        ulp = 2 ** -23 if dtype == torch.float32 else 2 ** -7
        bound = ulp * expected.float().abs() + 4 * 2 ** -23 * expected.float().abs().max()
        assert bool(((got.float() - expected.float()).abs() <= bound).all())
        untouched = torch.ones(old.numel(), dtype=torch.bool)
        untouched[where.reshape(-1)] = False
        assert torch.equal(state.kv_cache.view(-1)[untouched], old.view(-1)[untouched])


def test_apply_converts_what_the_scheduler_says_and_nothing_else(rotary):
    """The scheduler decides who grows; the worker converts each named request's cached keys once, from
    its own count of computed tokens."""
    from rope_ext.vllm_plugin.regrow import Regrower

    calls = []

    class Recording(Regrower):
        def rerotate(self, block_ids, num_tokens, factor_a, factor_b):
            calls.append((block_ids, num_tokens, factor_a, factor_b))

    requests = {"grows": types.SimpleNamespace(block_ids=([3, 1],), num_computed_tokens=200),
                "fresh": types.SimpleNamespace(block_ids=([5],), num_computed_tokens=0),
                "other": types.SimpleNamespace(block_ids=([7],), num_computed_tokens=90)}
    regrower = Recording(rotary, layers=[])
    regrower.apply(types.SimpleNamespace(requests=requests), {"grows": (1.0, 2.0), "fresh": (1.0, 4.0)})
    assert calls == [(([3, 1],), 200, 1.0, 2.0)]  # nothing cached yet: nothing to convert
    assert [(e.req_id, e.from_factor, e.to_factor, e.num_tokens) for e in regrower.events] == [
        ("grows", 1.0, 2.0, 200), ("fresh", 1.0, 4.0, 0)]


def test_rotate_keys_matches_the_layout_used_by_the_runner(rotary):
    # The runner rotates keys laid out [tokens, heads * head_size] with the module's own NeoX flag.
    keys = torch.randn(5, HEADS * 64)
    rows = rotary.cos_sin_cache[:5]
    _, expected = rotary.forward_native(torch.arange(5), torch.zeros(5, 64), keys.clone())
    assert torch.equal(rotate_keys(keys, rows, head_size=64, is_neox=rotary.is_neox_style), expected)


def test_the_internals_growth_reads_are_as_written_against():
    from rope_ext.vllm_plugin.regrow import check_growth_internals

    check_growth_internals()  # raises IncompatibleVllmError naming what changed
