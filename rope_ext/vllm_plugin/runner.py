"""Model-runner side: before every step, write each token's bucket row offset for the rotary modules.

The scheduler decides every request's factor and tells the workers in ``scheduler_output.ropeserve``
(:mod:`.scheduler`); :class:`RunnerRope` keeps what it was told (request id -> bucket index) until the
request finishes. Every model runner the plugin supports has one method that lays the scheduled tokens
out request by request in batch order (V1's ``_prepare_inputs``, V2's and the standalone CPU runner's
``prepare_inputs``; which runners a vLLM version has is its adapter's business, :mod:`.versions`, each a
:class:`RunnerHook`); after it runs, :meth:`RunnerRope.fill` writes ``np.repeat(row_offset_per_request, num_scheduled_tokens)`` into the one offsets buffer every
:class:`~.rotary.PerRequestRows` module of the model reads. No Python code runs per request: the per-request
lookup is ``np.fromiter(map(dict.__getitem__, req_ids))``, the rest is numpy. On a device the offsets
are staged in pinned memory and copied without blocking, as vLLM stages its own inputs. Every prefill
chunk and every decode step of a request therefore uses the scale the scheduler gave it, and the tokens
written at each factor are counted (``ropeserve_engine_rope_tokens_total``, :mod:`.stats`): the evidence
that scaling is applied.

A speculative drafter with a model (EAGLE, MTP, a draft model) shares the target's rotary modules or has
its own built from the same parameters, all reading the one offsets buffer. Its passes lay the step's
requests out again (one more token each for a draft model, one token each after the first pass), so each
pass first writes its own layout's offsets (:meth:`RunnerRope.fill_draft`, from the pass's
``query_start_loc``): a drafted token is rotated at its request's scale, as the target will verify it.

Under ``growth="rerotate"`` the step may also carry re-rotations: before the offsets are written, the
cached keys of those requests are converted to their new scale (:mod:`.regrow`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rope_ext.vllm_plugin import stats
from rope_ext.vllm_plugin.compat import Internal
from rope_ext.vllm_plugin.rotary import PerRequestRows

logger = logging.getLogger("vllm.ropeserve")


class MissingFactorError(RuntimeError):
    """A scheduled request has no factor: the scheduler's hook did not tell the workers (never guessed)."""


class RunnerRope:
    """Per model runner: the rotary modules, their shared offsets buffer, and each live request's bucket."""

    def __init__(self, modules: list[PerRequestRows], device: torch.device, *, counts: bool = True) -> None:
        first = modules[0]
        self.modules = modules
        self.scaling = first.scaling
        self.rows_per_bucket = first.rows_per_bucket
        self.bucket_of: dict[str, int] = {}
        # One buffer for every module (they are memoized per rotary configuration; a model with two
        # bases, such as Gemma 3, has two), so one write per step serves them all.
        buffer = first.token_offsets
        for module in modules[1:]:
            module.token_offsets = buffer
        self.buffer = buffer
        self.staging = None
        if device.type != "cpu":
            self.staging = torch.zeros(buffer.shape, dtype=buffer.dtype, pin_memory=True)
            self.host = self.staging.numpy()
        else:
            self.host = buffer.numpy()
        # Every rank of a tensor- or pipeline-parallel engine runs every step; one of them counts (``counts``).
        self.counts = counts
        self.computed = stats.counters(stats.COMPUTED)
        self.past = stats.counters(stats.PAST)
        self.capacity = np.array([self.scaling.capacity(b) for b in self.scaling.buckets], dtype=np.int64)
        self.step_rows: np.ndarray | None = None  # the step's row offset per request, in batch order
        self.regrower = None  # growth "rerotate": created at the first step (the KV caches exist then)
        # While the worker warms up (compile_or_warm_up_model), vLLM runs steps of its own requests, which
        # no scheduler annotated: they read plain rows (bucket 0), like dummy runs, and are not counted.
        self.warming_up = False

    def apply(self, runner, scheduler_output) -> None:
        """Take what the scheduler says about this step (new factors, finished requests, re-rotations)."""
        step = getattr(scheduler_output, "ropeserve", None)
        if step is None:
            raise MissingFactorError("the scheduler output carries no ropeserve factors: the plugin's scheduler hook "
                                     "is not in effect, and this step's scale is unknown")
        self.forget(scheduler_output.finished_req_ids)
        index = self.scaling.buckets.index
        for req_id, factor in step.factors.items():
            self.bucket_of[req_id] = index(factor)
        if step.rerotate:
            from rope_ext.vllm_plugin.regrow import Regrower

            if self.regrower is None:
                self.regrower = Regrower.discover(runner, self.modules[0])
            self.regrower.apply(runner, step.rerotate)

    def fill_plain(self, num_tokens: int) -> None:
        """Offsets 0 (bucket 0, plain RoPE) for a warm-up step's ``num_tokens`` tokens."""
        self.step_rows = None
        self._write(np.zeros(num_tokens, dtype=np.int64))

    def _write(self, per_token: np.ndarray) -> None:
        n = per_token.shape[0]
        self.host[:n] = per_token
        if self.staging is not None:
            self.buffer[:n].copy_(self.staging[:n], non_blocking=True)

    def _write_again(self, per_token: np.ndarray) -> None:
        """A second write in the same step (a drafter pass): on a device, the step's own copy from the
        pinned staging may not have run yet, so this one comes from memory of its own and waits for it."""
        if self.staging is None:
            self._write(per_token)
        else:
            self.buffer[: per_token.shape[0]].copy_(torch.from_numpy(per_token))

    def forget(self, finished_req_ids) -> None:
        """Drop finished requests (every step, the ones without tokens included)."""
        for req_id in finished_req_ids:
            self.bucket_of.pop(req_id, None)

    def fill(self, req_ids: list[str], num_scheduled_tokens: np.ndarray, num_computed_tokens: np.ndarray) -> None:
        """Write the row offset of every scheduled token (requests in batch order) and count them, and
        those at positions past their bucket's capacity (a request's tokens this step end at position
        ``num_computed + num_scheduled - 1``)."""
        try:
            buckets = np.fromiter(map(self.bucket_of.__getitem__, req_ids), dtype=np.int64, count=len(req_ids))
        except KeyError as exc:
            raise MissingFactorError(f"request {exc.args[0]} is scheduled but the scheduler never gave it a rope "
                                     "factor") from None
        counts = num_scheduled_tokens[: len(req_ids)]
        self.step_rows = buckets * self.rows_per_bucket
        self._write(np.repeat(self.step_rows, counts))
        if not self.counts:
            return
        n_buckets = len(self.scaling.buckets)
        self.computed.add_all(np.bincount(buckets, weights=counts, minlength=n_buckets).astype(np.int64))
        past = np.minimum(counts, np.maximum(num_computed_tokens[: len(req_ids)] + counts - self.capacity[buckets], 0))
        if past.any():
            self.past.add_all(np.bincount(buckets, weights=past, minlength=n_buckets).astype(np.int64))

    def fill_draft(self, query_start_loc) -> None:
        """Write the offsets of a drafter pass over this step's requests (batch order), laid out by
        ``query_start_loc`` (``num_requests + 1`` token boundaries; a CPU tensor or array)."""
        lengths = np.diff(np.asarray(query_start_loc, dtype=np.int64))
        if self.step_rows is None:  # a warm-up step's drafts: plain rows, like its target pass
            self._write_again(np.zeros(int(lengths.sum()), dtype=np.int64))
            return
        if lengths.shape[0] != self.step_rows.shape[0]:
            raise MissingFactorError(f"a drafter pass lays out {lengths.shape[0]} requests and the step scheduled "
                                     f"{self.step_rows.shape[0]}: the drafted tokens' scales are unknown")
        self._write_again(np.repeat(self.step_rows, lengths))


def runner_state(runner) -> RunnerRope | None:
    """The runner's state (set by the start-up checks, :mod:`.checks`), or None for a plain model."""
    return runner.__dict__.get("_ropeserve")


Batch = tuple[Sequence[str], np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DrafterHook:
    """A speculative drafter class (with a model) and the method it calls before a pass whose layout is not
    the target's; the runner keeps the drafter as ``runner.<attribute>`` and the drafter its model as
    ``.model``. ``query_start_loc(args)`` reads the pass's layout (``num_requests + 1`` token boundaries, the
    step's requests in batch order) from the method's positional arguments. A pass that runs without calling
    the method must be laid out as the target's step (whose offsets are then in place). ``unsupported(drafter)``
    names a feature of the drafter that lays its passes out otherwise (None: none)."""

    target: str  # "module:Class"
    method: str
    query_start_loc: Callable[[tuple], Any]
    attribute: str = "drafter"
    unsupported: Callable[[Any], str | None] = lambda drafter: None

    def drafter_class(self) -> type:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def drafter(self, runner):
        """The runner's drafter when it drafts with a model (None for none, or a model-free one)."""
        drafter = getattr(runner, self.attribute, None)
        return drafter if isinstance(getattr(drafter, "model", None), torch.nn.Module) else None

    def hooked(self, drafter) -> bool:
        """``drafter`` is this hook's class (or a subclass that keeps the hooked method)."""
        return (isinstance(drafter, self.drafter_class())
                and getattr(getattr(type(drafter), self.method), "_ropeserve", False))


@dataclasses.dataclass(frozen=True)
class RunnerHook:
    """A model runner class and its method that lays out a step's tokens (``method(scheduler_output, ...)``).

    ``batch(runner, args, result)`` reads the step's batch from the method's positional arguments
    (``scheduler_output`` first) and its result: the requests in batch order, their scheduled token counts,
    and the tokens each had computed before the step. ``rerotate``: growth by re-rotation (:mod:`.regrow`) can read this runner's request states. ``drafter``: how this runner's
    speculative drafters lay out their passes (None: a drafter with a model is refused on this runner)."""

    target: str  # "module:Class"
    method: str
    batch: Callable[[Any, tuple, Any], Batch]
    rerotate: bool = False
    drafter: DrafterHook | None = None

    def runner_class(self) -> type:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def hooked(self, runner) -> bool:
        """``runner`` is this hook's class (or a subclass) and runs the plugin's hooks, not overrides of them."""
        cls = type(runner)
        return (issubclass(cls, self.runner_class())
                and all(getattr(getattr(cls, name), "_ropeserve", False) for name in (self.method, "execute_model")))


def read_input_batch(runner, args, input_batch) -> Batch:
    """The batch of a V2-style ``prepare_inputs``: the ``InputBatch`` it returns."""
    return input_batch.req_ids, input_batch.num_scheduled_tokens, input_batch.num_computed_tokens_np


# The V2 model runner, the same in vLLM 0.32.0 to 0.34.0 (its CPU subclass inherits the hook). Not run on
# the CPU test bed (it needs Triton with a GPU or CPU backend): unit-tested against its real InputBatch.
V2_RUNNER = RunnerHook("vllm.v1.worker.gpu.model_runner:GPUModelRunner", "prepare_inputs", read_input_batch)
V2_INTERNALS: tuple[Internal, ...] = (
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.prepare_inputs", "patched: the per-token offsets",
             params=("scheduler_output", "batch_req_state", "batch_desc", "num_active_loras")),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.execute_model",
             "patched: a step without tokens still ends its finished requests", params=("scheduler_output",)),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.get_model", "the rotary modules", params=()),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.__init__", "the device", attrs=("device",)),
    Internal("vllm.v1.worker.gpu.input_batch:InputBatch", "the step's requests, counts and computed tokens",
             fields=("req_ids", "num_scheduled_tokens", "num_computed_tokens_np")),
)


def patch_model_runners(hooks: Sequence[RunnerHook]) -> None:
    """Install, on each runner class, the offsets after its layout method and the finished requests' end
    at the start of every step (a step with no scheduled tokens never reaches the layout method)."""
    for hook in hooks:
        cls = hook.runner_class()
        _wrap_layout(cls, hook)
        _wrap_execute_model(cls)
        if hook.drafter is not None:
            _wrap_draft_layout(hook.drafter)


def _wrap_layout(cls: type, hook: RunnerHook) -> None:
    original = cls.__dict__[hook.method]
    if not getattr(original, "_ropeserve", False):
        setattr(cls, hook.method, layout_hook(original, hook.batch))


def _wrap_execute_model(cls: type) -> None:
    original = cls.__dict__["execute_model"]
    if not getattr(original, "_ropeserve", False):
        cls.execute_model = execute_model_hook(original)


def _wrap_draft_layout(hook: DrafterHook) -> None:
    """Wrap the method on the hook's class (also when it inherits it: sibling classes stay unhooked)."""
    cls = hook.drafter_class()
    original = getattr(cls, hook.method)
    if not getattr(original, "_ropeserve", False):
        setattr(cls, hook.method, draft_layout_hook(original, hook.query_start_loc))


def draft_layout_hook(original, query_start_loc):
    """A drafter's per-pass layout method that first writes the pass's offsets (the drafter's runner state
    is set by the start-up checks when the target is dynamic)."""

    def layout(self, *args, **kwargs):
        state = self.__dict__.get("_ropeserve")
        if state is not None:
            state.fill_draft(query_start_loc(args))
        return original(self, *args, **kwargs)

    layout._ropeserve = True
    layout.__wrapped__ = original
    return layout


def layout_hook(original, batch):
    """``original`` (a runner's layout method), then the step's factors applied and its offsets written."""

    def layout(self, *args):
        result = original(self, *args)
        state = runner_state(self)
        if state is not None:
            req_ids, counts, computed = batch(self, args, result)
            if state.warming_up and getattr(args[0], "ropeserve", None) is None:
                state.fill_plain(int(np.sum(counts[: len(req_ids)])))  # vLLM's warm-up steps: plain rows
            else:
                state.apply(self, args[0])
                state.fill(req_ids, counts, computed)
        return result

    layout._ropeserve = True
    layout.__wrapped__ = original
    return layout


def execute_model_hook(original):
    """A runner's ``execute_model`` that first ends the finished requests of a step with no tokens (such a
    step returns before the layout method)."""

    def execute_model(self, scheduler_output, *args, **kwargs):
        state = runner_state(self)
        if state is not None and not scheduler_output.total_num_scheduled_tokens:
            state.forget(scheduler_output.finished_req_ids)
        return original(self, scheduler_output, *args, **kwargs)

    execute_model._ropeserve = True
    execute_model.__wrapped__ = original
    return execute_model
