"""Growth by re-rotation (``growth: "rerotate"``): convert a request's cached keys to a larger bucket in place.

The scheduler decides when a request grows (:mod:`.scheduler`) and tells the workers which requests to
convert in the step's ``ropeserve.rerotate``; before that step runs, :meth:`Regrower.apply` converts every
cached key of each, in every attention layer, from s_k to the new bucket s (one rotation per rotary pair by
the angle difference, times ``m(s) / m(s_k)``: :mod:`rope_ext.rerotate`), values untouched. This step's
tokens and all later ones are rotated at s.

What the re-rotation does and does not give: keys then carry the new scale's positions exactly (float32
rounding), but the keys and values of earlier tokens in layers >= 1 were computed from hidden states
that attended at the old scale. The result is therefore the paper's Dynamic Scaling with keys cached
before RoPE (the YaRN paper, section 3.3), not a fresh prefill at the new scale; tests/plugin/
test_engine_regrow.py checks the former against an independent oracle (float32 tolerance) and measures
the gap to the latter. (The default growth mode, ``"recompute"``, gives the latter exactly.)

Where the keys are: a layer's cache tensor (``static_forward_context[name].kv_cache``) holds blocks whose
interior layout depends on the backend and, on CPU, on the ISA and dtype (vLLM 0.32's CPU ``vec`` layout
stores each head's keys of a block dim-major, ``[head_size, block_size]``; ``amx`` tiles them in 16-token
panels). Rather than hard-coding layouts, :class:`KeySlots` *probes* the backend once per layer geometry:
it writes coded keys through the layer's own ``impl.do_kv_cache_update`` into a scratch three-block
tensor and reads back where every (token-in-block, head, dim) landed. A request's block ids come from
its ``CachedRequestState.block_ids`` (token j lives in block ``block_ids[j // block_size]``). The hook
runs in ``_prepare_inputs``, after the previous step's forward has written its keys (the CPU platform
turns vLLM's asynchronous scheduling off).

Prefix caching: a block re-rotated for one request must never serve another, so at admission a request
that may grow gets a cache salt of its own (:func:`rope_ext.vllm_plugin.admission.private_salt`): it
neither reads other requests' blocks nor leaves blocks another request could hit. The price: such
requests get no prefix-cache hits.

The conversion per layer: gather the request's blocks, convert the keys in float32 with vLLM's stock
rotary kernel (``ops.rotary_embedding``, the keys passed as its query, the delta table as its cos/sin
cache), round once to the cache dtype, write back.

Scope: vLLM's CPU attention backend with an unquantized KV cache, full-attention layers only (checked
at the first re-rotation; anything else raises :class:`UnsupportedGrowthError`). No CUDA engine has run
this path, so the plugin refuses to start ``rerotate`` off CPU (:mod:`.checks`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import torch

from rope_ext.rerotate import delta_rows

logger = logging.getLogger("vllm.ropeserve")


class UnsupportedGrowthError(RuntimeError):
    """growth "rerotate" was asked for on a configuration the re-rotation does not handle."""


# --- where a layer keeps its keys ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeySlots:
    """Where the keys of one block live in a layer's cache tensor.

    ``offsets[t, h, d]`` is the flat (contiguous) offset of key element (token t of the block, head h,
    dim d) within block 0; block b adds ``b * block_stride``. When the offsets are affine in (t, h, d)
    (CPU ``vec``/``vec16`` layouts), ``strides`` holds their (token, head, dim) strides and the keys are
    read and written through a strided view of the cache instead of gathered element by element."""

    offsets: torch.Tensor  # [block_size, num_kv_heads, head_size], int64
    block_stride: int
    strides: tuple[int, int, int] | None = None

    @property
    def block_size(self) -> int:
        return self.offsets.shape[0]

    def token_offsets(self, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Flat offsets ``[num_tokens, heads * head_size]`` of the keys of a request's first tokens."""
        blocks = block_ids.to(torch.int64)[:, None, None, None] * self.block_stride
        per_token = (blocks + self.offsets[None]).reshape(-1, self.offsets[0].numel())
        return per_token[:num_tokens]

    def _view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The keys of every block as a strided view ``[num_blocks, block_size, heads, head_size]``."""
        num_blocks = kv_cache.numel() // self.block_stride
        size = (num_blocks, *self.offsets.shape)
        return kv_cache.as_strided(size, (self.block_stride, *self.strides),
                                   kv_cache.storage_offset() + int(self.offsets[0, 0, 0]))

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """A copy of the keys of ``block_ids`` (whole blocks), ``[blocks * block_size, heads * head_size]``."""
        if self.strides is not None:
            blocks = self._view(kv_cache).index_select(0, block_ids)
        else:
            blocks = kv_cache.view(-1)[self.token_offsets(block_ids, block_ids.numel() * self.block_size)]
        return blocks.reshape(block_ids.numel() * self.block_size, -1)

    def scatter(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Write ``keys`` (as :meth:`gather` returns them) back into the blocks ``block_ids``."""
        if self.strides is not None:
            self._view(kv_cache).index_copy_(0, block_ids, keys.reshape(block_ids.numel(), *self.offsets.shape))
        else:
            kv_cache.view(-1)[self.token_offsets(block_ids, keys.shape[0])] = keys

    @classmethod
    def probe(cls, layer, kv_cache: torch.Tensor, block_dim: int) -> KeySlots:
        """Write coded keys through ``layer.impl.do_kv_cache_update`` into a scratch cache shaped like
        ``kv_cache`` (three blocks) and read where each key element landed."""
        shape = list(kv_cache.shape)
        shape[block_dim] = 3
        heads, head_size = int(layer.num_kv_heads), int(layer.head_size)
        block_size = _block_size(kv_cache, block_dim, heads, head_size)
        n = 2 * block_size  # blocks 1 and 2, to read the block stride too
        slots = torch.arange(n, dtype=torch.int64, device=kv_cache.device) + block_size
        index = {
            "j": torch.arange(n)[:, None, None].expand(n, heads, head_size),
            "h": torch.arange(heads)[None, :, None].expand(n, heads, head_size),
            "d": torch.arange(head_size)[None, None, :].expand(n, heads, head_size),
        }
        written, decoded = None, {}
        for name, values in index.items():
            digits = []
            for digit in (values % 64, values // 64):  # small integers are exact in every cache dtype
                scratch = torch.zeros(shape, dtype=kv_cache.dtype, device=kv_cache.device)
                key = (digit + 1).to(device=kv_cache.device, dtype=kv_cache.dtype).contiguous()
                layer.impl.do_kv_cache_update(layer, key, torch.zeros_like(key), scratch, slots)
                digits.append(scratch.reshape(-1).to(torch.float64).cpu())
            mask = digits[0] > 0
            if written is None:
                written = mask
            elif not torch.equal(mask, written):
                raise UnsupportedGrowthError("the KV cache layout could not be probed (inconsistent writes)")
            decoded[name] = ((digits[0] - 1) + 64 * (digits[1] - 1)).round().to(torch.int64)
        where = written.nonzero().squeeze(1)
        if where.numel() != n * heads * head_size:
            raise UnsupportedGrowthError("the KV cache layout could not be probed (keys not stored one for one)")
        j, h, d = (decoded[k][where] for k in ("j", "h", "d"))
        flat = torch.full((n, heads, head_size), -1, dtype=torch.int64)
        flat[j, h, d] = where
        if (flat < 0).any():
            raise UnsupportedGrowthError("the KV cache layout could not be probed (missing key slots)")
        stride = flat[block_size:] - flat[:block_size]
        block_stride = int(stride.flatten()[0])
        if not bool((stride == block_stride).all()) or block_stride <= 0:
            raise UnsupportedGrowthError("the KV cache layout could not be probed (blocks not equally strided)")
        if block_stride != kv_cache.stride(block_dim):
            raise UnsupportedGrowthError("the probed block stride differs from the cache's")
        offsets = flat[:block_size] - block_stride
        return cls(offsets=offsets, block_stride=block_stride, strides=_affine_strides(offsets))


def _affine_strides(offsets: torch.Tensor) -> tuple[int, int, int] | None:
    """(token, head, dim) strides when ``offsets`` is affine in its three indices, else None."""
    t, h, d = (torch.arange(n) for n in offsets.shape)
    strides = tuple(int(x) for x in (
        offsets[min(1, offsets.shape[0] - 1), 0, 0] - offsets[0, 0, 0],
        offsets[0, min(1, offsets.shape[1] - 1), 0] - offsets[0, 0, 0],
        offsets[0, 0, min(1, offsets.shape[2] - 1)] - offsets[0, 0, 0]))
    affine = offsets[0, 0, 0] + t[:, None, None] * strides[0] + h[None, :, None] * strides[1] \
        + d[None, None, :] * strides[2]
    return strides if torch.equal(affine, offsets) else None


def _block_size(kv_cache: torch.Tensor, block_dim: int, heads: int, head_size: int) -> int:
    per_block = kv_cache[(slice(None),) * block_dim + (0,)].numel()
    block_size, rest = divmod(per_block, 2 * heads * head_size)
    if rest:
        raise UnsupportedGrowthError(f"a cache block of {per_block} elements is not keys plus values")
    return block_size


@dataclasses.dataclass
class _Layer:
    name: str
    kv_cache: torch.Tensor
    group: int
    slots: KeySlots


# --- the runner side ------------------------------------------------------------------------------------------

def check_growth_internals() -> None:
    """Raise ``IncompatibleVllmError`` unless the vLLM internals growth reads are as written against."""
    import inspect

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    from rope_ext.vllm_plugin.compat import _require

    _require(list(inspect.signature(CPUAttentionBackendImpl.do_kv_cache_update).parameters)[1:]
             == ["layer", "key", "value", "kv_cache", "slot_mapping"],
             "CPUAttentionBackendImpl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)")
    _require("block_ids" in getattr(CachedRequestState, "__dataclass_fields__", {}), "CachedRequestState.block_ids")
    _require({"kv_cache_groups", "num_blocks"} <= set(getattr(KVCacheConfig, "__dataclass_fields__", {})),
             "KVCacheConfig.kv_cache_groups / num_blocks")
    _require("num_computed_tokens_cpu" in inspect.getsource(InputBatch.__init__), "InputBatch.num_computed_tokens_cpu")


@dataclasses.dataclass
class GrowthEvent:
    req_id: str
    from_factor: float
    to_factor: float
    num_tokens: int
    seconds: float


class Regrower:
    """Per-model-runner: the layers' key caches and the growth of requests that outgrow their bucket."""

    def __init__(self, rotary, layers: list[_Layer]) -> None:
        self.rotary = rotary  # one per-request rotary module (.rotary): scaling, stacked table, head layout
        self.layers = layers
        self.events: collections.deque[GrowthEvent] = collections.deque(maxlen=1024)  # the latest growths

    @classmethod
    def discover(cls, runner, rotary) -> Regrower:
        from vllm.utils.torch_utils import is_quantized_kv_cache
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        check_growth_internals()
        if runner.device.type != "cpu":
            raise UnsupportedGrowthError("growth 'rerotate' is implemented and validated for vLLM's CPU backend only")
        if is_quantized_kv_cache(runner.cache_config.cache_dtype):
            raise UnsupportedGrowthError(f"growth needs an unquantized KV cache (got {runner.cache_config.cache_dtype})")
        config = runner.kv_cache_config
        context = runner.compilation_config.static_forward_context
        layers, seen = [], set()
        for g, group in enumerate(config.kv_cache_groups):
            if type(group.kv_cache_spec) is not FullAttentionSpec:
                raise UnsupportedGrowthError(f"growth handles full attention only (got {group.kv_cache_spec})")
            for name in group.layer_names:
                layer = context[name]
                kv = layer.kv_cache
                if not isinstance(kv, torch.Tensor) or kv.data_ptr() in seen:
                    continue  # layers sharing another layer's cache are converted once
                seen.add(kv.data_ptr())
                if not kv.is_contiguous():
                    raise UnsupportedGrowthError(f"layer {name}: non-contiguous KV cache")
                if int(layer.head_size) != rotary.head_size:
                    raise UnsupportedGrowthError(f"layer {name}: head size differs from the rotary's")
                block_dims = [i for i, size in enumerate(kv.shape) if size == config.num_blocks]
                if len(block_dims) != 1:
                    raise UnsupportedGrowthError(f"layer {name}: cannot tell the block dim of {tuple(kv.shape)}")
                slots = KeySlots.probe(layer, kv, block_dims[0])
                if slots.block_size != group.kv_cache_spec.block_size:
                    raise UnsupportedGrowthError(f"layer {name}: kernel blocks differ from the manager's")
                layers.append(_Layer(name, kv, g, slots))
        logger.info("ropeserve: growth on; %d KV cache layers, block size %d", len(layers),
                    layers[0].slots.block_size if layers else 0)
        return cls(rotary, layers)

    def apply(self, runner, rerotations: dict[str, tuple[float, float]]) -> None:
        """Before a step: convert the cached keys of each request the scheduler grew, ``{id: (from, to)}``."""
        for req_id, (factor_a, factor_b) in rerotations.items():
            state = runner.requests[req_id]
            cached = int(state.num_computed_tokens)
            start = time.perf_counter()
            if cached:
                self.rerotate(state.block_ids, cached, factor_a, factor_b)
            seconds = time.perf_counter() - start
            self.events.append(GrowthEvent(req_id, factor_a, factor_b, cached, seconds))
            logger.info("ropeserve: request %s: %d cached keys in %d layers re-rotated from rope factor %s to %s in "
                        "%.1f ms", req_id, cached, len(self.layers), factor_a, factor_b, 1e3 * seconds)

    def rerotate(self, block_ids: tuple[list[int], ...], num_tokens: int, factor_a: float, factor_b: float) -> None:
        """Convert the keys of a request's first ``num_tokens`` tokens from bucket a to bucket b, in place.

        Per layer: gather the request's blocks (a copy), convert its first ``num_tokens`` keys in float32
        with vLLM's stock rotary kernel and the delta table (keys passed as its query), round once to
        the cache dtype, write the blocks back (the unwritten tail of the last block unchanged)."""
        from vllm import _custom_ops as ops

        rotary = self.rotary
        table = rotary.cos_sin_cache
        rows_a = table[rotary.row_offset(factor_a):][:num_tokens]
        rows_b = table[rotary.row_offset(factor_b):][:num_tokens]
        delta = delta_rows(rows_a, rows_b)  # float32 [num_tokens, rotary_dim]
        positions = torch.arange(num_tokens, dtype=torch.int64)
        for layer in self.layers:
            size = layer.slots.block_size
            ids = torch.tensor(block_ids[layer.group][: -(-num_tokens // size)], dtype=torch.int64)
            blocks = layer.slots.gather(layer.kv_cache, ids)
            keys = blocks[:num_tokens].to(torch.float32, copy=True)
            ops.rotary_embedding(positions, keys, None, rotary.head_size, delta, rotary.is_neox_style)
            blocks[:num_tokens] = keys
            layer.slots.scatter(layer.kv_cache, ids, blocks)
