"""A plain transformers oracle of per-request growth: the default model, float32, with our cos/sin tables.

It decodes a given continuation token by token (teacher forcing) with a ``DynamicCache`` and, when the
next token would pass the current bucket's capacity, converts every layer's cached keys with
``rope_ext.rerotate.rerotate_reference`` (the float64 two-step reference, not the engine's fast path)
and continues at the larger bucket: the paper's Dynamic Scaling with keys cached before RoPE. Two
controls: ``regrow=False`` switches the scale without converting the keys (the stale-key error), and
:meth:`GrowthOracle.fresh` is a fresh prefill of all tokens at one scale.

Each method returns float64 log-probabilities ``[steps, vocab]``: row k is the distribution of the k-th
continuation token.
"""

from __future__ import annotations

import torch

from rope_ext import RopeScaling, RotaryConfig, bucket_frequencies, build_bucket_tables
from rope_ext.policy import bucket_for_length
from rope_ext.rerotate import rerotate_reference


class _TableRope(torch.nn.Module):
    """Replaces the model's rotary module: rows of our stacked bucket tables at the current factor."""

    def __init__(self, tables) -> None:
        super().__init__()
        self.tables, self.factor = tables, 1.0

    def forward(self, x, position_ids):
        rows = self.tables.cos_sin_cache[self.tables.row_offset(self.factor) + position_ids]
        cos, sin = rows.chunk(2, dim=-1)  # HF's rotate_half layout repeats each half
        return torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((sin, sin), dim=-1).to(x.dtype)


class GrowthOracle:
    def __init__(self, model_dir: str, scaling: RopeScaling, rows_per_bucket: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
        config = self.model.config
        self.head_size = config.head_dim
        self.rotary = RotaryConfig(self.head_size, float(config.rope_parameters["rope_theta"]))
        self.scaling = scaling
        self.rope = _TableRope(build_bucket_tables(self.rotary, scaling, rows_per_bucket=rows_per_bucket))
        self.model.model.rotary_emb = self.rope

    @torch.no_grad()
    def dynamic(self, prompt: list[int], continuation: list[int], *, start: float = 1.0,
                regrow: bool = True) -> torch.Tensor:
        from transformers import DynamicCache

        self.rope.factor = start
        cache = DynamicCache(config=self.model.config)
        logits = self.model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
        out = [torch.log_softmax(logits.double(), -1)]
        for k, token in enumerate(continuation[:-1]):
            position = len(prompt) + k
            if position + 1 > self.scaling.capacity(self.rope.factor):
                new = bucket_for_length(position + 1, self.scaling, at_least=self.rope.factor)
                if regrow:
                    self._rerotate(cache, self.rope.factor, new)
                self.rope.factor = new
            logits = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                                position_ids=torch.tensor([[position]])).logits[0, -1]
            out.append(torch.log_softmax(logits.double(), -1))
        return torch.stack(out)

    def _rerotate(self, cache, factor_a: float, factor_b: float) -> None:
        freq_a = bucket_frequencies(self.rotary, self.scaling, factor_a)
        freq_b = bucket_frequencies(self.rotary, self.scaling, factor_b)
        for layer in cache.layers:  # keys: [batch 1, kv heads, tokens, head_size], cached after RoPE
            keys = layer.keys[0].transpose(0, 1)
            converted = rerotate_reference(keys, torch.arange(keys.shape[0]), freq_a, freq_b,
                                           head_size=self.head_size)
            layer.keys = converted.transpose(0, 1).unsqueeze(0).contiguous()

    @torch.no_grad()
    def fresh(self, prompt: list[int], continuation: list[int], factor: float) -> torch.Tensor:
        self.rope.factor = factor
        logits = self.model(torch.tensor([prompt + continuation])).logits[0].double()
        return torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(continuation)]
