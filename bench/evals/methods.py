"""The methods compared, as engine configurations of the same model (SmolLM2-135M-Instruct, L = 8192).

A method maps a request's planned context length (prompt + max_tokens) to the engine that serves it:
most methods are one engine for every length; ``yarn-fit`` (static YaRN at the smallest factor that
fits) is one engine per factor, chosen with the plugin's own policy (:func:`rope_ext.choose_factor`), and
is plain RoPE at or below L. Engines are described by :class:`EngineConfig` (hf_overrides as vLLM takes
them, all with enforce_eager through :mod:`server.offline`); one engine serves every cell that maps to it.

vLLM 0.32 names checked in its source (``rotary_embedding/__init__.py``, ``config/model.py``):
``linear`` and ``ntk`` take ``factor`` and vLLM multiplies max_model_len by it; ``yarn`` does not, so
static YaRN sets ``max_position_embeddings`` itself. vLLM's ``ntk`` is the fixed-NTK variant (base b*s,
then inv_freq / s^(2/d)), not the paper's NTK-aware base b*s^(d/(d-2)) that the plugin's dynamic NTK uses
per bucket; the two differ only slightly in the highest frequencies.

The cos/sin table pitfall: vLLM builds a rotary table of ``max_position_embeddings`` rows (the model's
8192) for plain RoPE and for ``ntk``, whatever max_model_len is; ``linear`` and ``yarn`` build ``rows x
factor``. Raising max_model_len alone (``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` for plain RoPE, or the factor
for ``ntk``) therefore makes positions past 8192 index past the table. So plain RoPE past L runs on an
engine whose ``max_position_embeddings`` covers the positions (:func:`plain_long`: the same plain RoPE
rows, more of them), and ``ntk`` gets the same override; below L plain RoPE is the stock config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from typing import Any

from rope_ext import RopeScaling, choose_factor
from rope_ext.config import default_buckets

L = 8192  # SmolLM2-135M's training context (max_position_embeddings)
ROPE_THETA = 100000.0
MAX_FACTOR = 8.0
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # layers x (K, V) x KV heads x head dim x bf16 bytes = 23 KiB
LONG_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"
# The CPU attention's split-KV depends on the batch; off, a request's numbers depend on it alone.
DETERMINISTIC_ENV = {"VLLM_CPU_ATTN_SPLIT_KV": "0"}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """One engine configuration: a name, vLLM's hf_overrides (as JSON, so the config is hashable) and the
    context it serves by itself (beyond it, max_model_len is raised with VLLM_ALLOW_LONG_MAX_MODEL_LEN)."""

    name: str
    overrides_json: str | None
    capacity: int

    @property
    def hf_overrides(self) -> dict[str, Any] | None:
        return None if self.overrides_json is None else json.loads(self.overrides_json)

    def spec(self, model: str, *, dtype: str, max_len: int, seed: int = 0):
        """The :class:`server.offline.EngineSpec` serving requests up to ``max_len`` tokens."""
        from server.offline import EngineSpec

        max_model_len = max(max_len, self.capacity)
        env = dict(DETERMINISTIC_ENV)
        if max_model_len > self.capacity:
            env[LONG_ENV] = "1"
        kv_gib = math.ceil(max_model_len * KV_BYTES_PER_TOKEN * (2 if dtype == "float32" else 1) / 2**30) + 1
        # Prefix caching off: every request is computed from scratch, whatever ran before it, so a
        # cell's numbers do not depend on which cells were already done (resumable and deterministic).
        return EngineSpec(model=model, dtype=dtype, max_model_len=max_model_len, hf_overrides=self.hf_overrides,
                          enable_prefix_caching=False, kv_cache_gib=kv_gib, seed=seed, env=env)


def _config(name: str, overrides: dict[str, Any] | None, capacity: int) -> EngineConfig:
    return EngineConfig(name, None if overrides is None else json.dumps(overrides, sort_keys=True), capacity)


def plain() -> EngineConfig:
    """Stock plain RoPE: no overrides; serves up to L."""
    return _config("plain", None, L)


def plain_long(positions: int = int(L * MAX_FACTOR)) -> EngineConfig:
    """Plain RoPE with a rotary table of ``positions`` rows, so positions past L extrapolate plain RoPE
    instead of reading past vLLM's 8192-row table."""
    return _config(f"plain-{positions // 1024}k", {"max_position_embeddings": positions}, positions)


def static_yarn(factor: float) -> EngineConfig:
    if factor == 1:
        return plain()  # YaRN at s = 1 is plain RoPE (no interpolation, attention factor 1)
    return _config(f"yarn-x{factor:g}", {
        "rope_parameters": {"rope_type": "yarn", "rope_theta": ROPE_THETA, "factor": float(factor),
                            "original_max_position_embeddings": L},
        "max_position_embeddings": int(L * factor)}, int(L * factor))


def linear(factor: float) -> EngineConfig:
    return _config(f"linear-x{factor:g}", {"rope_parameters": {
        "rope_type": "linear", "rope_theta": ROPE_THETA, "factor": float(factor)}}, int(L * factor))


def ntk(factor: float) -> EngineConfig:
    """vLLM's ``ntk`` at ``factor``, its table sized to the L*factor positions it serves (see above)."""
    return _config(f"ntk-x{factor:g}", {"rope_parameters": {
        "rope_type": "ntk", "rope_theta": ROPE_THETA, "factor": float(factor)},
        "max_position_embeddings": int(L * factor)}, int(L * factor))


def plugin(rope_type: str, factor: float = MAX_FACTOR, buckets: tuple[float, ...] | None = None) -> EngineConfig:
    """The plugin engine; with ``buckets`` (default: rope_ext's, sqrt(2) apart since the decide grid; powers of
    two before), named ``...-buckets...``: every YaRN policy runs on one engine holding :data:`FINE_BUCKETS`
    (the stored cells name it so), dynamic NTK on the plain name (its cells run at 2 and 4, which every
    bucket list here holds, and a bucket's table does not depend on the others)."""
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": ROPE_THETA, "factor": float(factor),
                              "original_max_position_embeddings": L}
    if buckets is not None:
        params["buckets"] = list(buckets)
    suffix = "" if buckets is None else "-buckets" + "-".join(f"{b:.3g}" for b in buckets)
    return _config(f"plugin-{rope_type}-x{factor:g}{suffix}", {"rope_parameters": params}, int(L * factor))


# The policies as the decide grid measures them (its stored cells are keyed by these names): powers of two,
# rope_ext's default until the grid chose buckets sqrt(2) apart ("dynamic-yarn-fine", now the default).
POWERS = (1.0, 2.0, 4.0, 8.0)
POLICY = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=MAX_FACTOR, buckets=POWERS)
# Factors sqrt(2) apart: every bucket of every ropeserve policy compared here (they share one engine).
FINE_BUCKETS = default_buckets(MAX_FACTOR)
POLICIES: dict[str, RopeScaling] = {
    "dynamic-yarn": POLICY,
    "dynamic-yarn-headroom": dataclasses.replace(POLICY, headroom=1.25),
    "dynamic-yarn-fine": dataclasses.replace(POLICY, buckets=FINE_BUCKETS),
    "dynamic-ntk": dataclasses.replace(POLICY, method="dynamic_ntk"),
}


def fitting_factor(context: int, policy: RopeScaling = POLICY) -> float:
    """The factor ``policy`` gives a request of planned length ``context`` (its prompt and max_tokens: the
    cells' lengths are planned lengths, see :mod:`bench.evals.inputs`)."""
    return choose_factor(context, 0, policy)


@dataclasses.dataclass(frozen=True)
class Method:
    """A method: the engine serving a request of each planned length, the scale it runs at, and the
    factor the request asks the engine for (the ropeserve policies: decided here by
    :mod:`rope_ext.policy`, applied by the plugin engine as a per-request override)."""

    name: str
    label: str
    engine_for: Callable[[int], EngineConfig]  # planned context length -> engine
    scale: Callable[[int], float]  # planned context length -> the RoPE scale it runs at
    forced: bool = False  # the request asks for ``scale`` (vllm_xargs rope_factor)

    def extra_args(self, context: int) -> dict[str, float] | None:
        return {"rope_factor": self.scale(context)} if self.forced else None


def _fixed(factor: float) -> Callable[[int], float]:
    return lambda n: factor


def _ropeserve(name: str, label: str) -> Method:
    """A ropeserve policy: every YaRN policy on one plugin engine holding all their buckets (the tables of
    a bucket are the same whatever other buckets stand beside it), dynamic NTK on its own."""
    policy = POLICIES[name]
    if policy.method == "dynamic_yarn":
        engine = plugin("dynamic_yarn", buckets=FINE_BUCKETS)
    else:
        engine = plugin(policy.method)
    return Method(name, label, lambda n: engine, functools.partial(fitting_factor, policy=policy), forced=True)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("unscaled", "unscaled (plain RoPE)", lambda n: plain() if n <= L else plain_long(), _fixed(1.0)),
    Method("yarn-x8", "static YaRN x8 (stock vLLM)", lambda n: static_yarn(8), _fixed(8.0)),
    Method("yarn-fit", "static YaRN, smallest factor that fits", lambda n: static_yarn(fitting_factor(n)),
           fitting_factor),
    Method("yarn-x2", "static YaRN x2", lambda n: static_yarn(2), _fixed(2.0)),
    Method("yarn-x4", "static YaRN x4", lambda n: static_yarn(4), _fixed(4.0)),
    Method("linear-x8", "PI (linear) x8", lambda n: linear(8), _fixed(8.0)),
    Method("ntk-x8", "static NTK x8 (vLLM ntk)", lambda n: ntk(8), _fixed(8.0)),
    _ropeserve("dynamic-ntk", "ropeserve dynamic NTK"),
    _ropeserve("dynamic-yarn", "ropeserve dynamic YaRN, powers of two"),
    _ropeserve("dynamic-yarn-headroom", "ropeserve dynamic YaRN, powers of two, headroom 1.25"),
    _ropeserve("dynamic-yarn-fine", "ropeserve dynamic YaRN, buckets sqrt(2) apart (the default)"),
)}


def get_methods(names: list[str] | tuple[str, ...]) -> list[Method]:
    """The methods named, in order; an unknown name raises ValueError listing the known ones."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return [METHODS[n] for n in names]
