"""Scheduler side: requests grow into larger buckets, and every step tells the workers each request's factor.

We wrap vLLM's ``Scheduler.schedule`` (the engine core's; ``AsyncScheduler`` inherits it). Before vLLM
schedules a step, :meth:`SchedulerRope.grow` finds the requests the step would take past their bucket's
capacity ``floor(L * s)`` (the tokens they will hold after it: ``num_tokens_with_spec`` plus in-flight
placeholders) and moves each to the bucket :func:`rope_ext.policy.grown_factor` names, by the model's
growth mode:

- ``"recompute"`` (vLLM's own recompute preemption): the request is preempted, its blocks released (a block
  another request reads stays cached: blocks are only ever released, never changed), its cache re-salted
  for the new scale and its block hashes recomputed; vLLM then prefills it again, prompt and generated
  tokens, at the new scale, reusing any prefix blocks cached at that scale. The result is exactly a fresh
  request of the same tokens at the new scale, on any device, with stock kernels;
- ``"rerotate"``: the request keeps its blocks and the workers re-rotate its cached keys (:mod:`.regrow`).

A request pinned by an override never grows; one that runs past its bucket is counted as an overflow.

After vLLM has scheduled the step, :meth:`SchedulerRope.annotate` attaches ``scheduler_output.ropeserve``
(a :class:`RopeStep`): the factor of every scheduled request the workers have not been told yet (new and
grown requests) and the re-rotations to do, and counts the step's tokens per factor. The workers apply
what they are told (:mod:`.runner`); they decide nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from rope_ext.policy import grown_factor
from rope_ext.vllm_plugin import stats
from rope_ext.vllm_plugin.admission import EngineRope, RopeState, salt_for
from rope_ext.vllm_plugin.config import scaling_for_model

logger = logging.getLogger("vllm.ropeserve")


class MissingRopeStateError(RuntimeError):
    """A request reached the scheduler without passing admission: the plugin's engine-core hook is not in
    effect, and its tokens would be computed at the wrong scale."""


@dataclasses.dataclass
class RopeStep:
    """What the workers need for one step: new factors by request id, and re-rotations
    ``{req_id: (from_factor, to_factor)}`` to apply to cached keys before the step runs."""

    factors: dict[str, float]
    rerotate: dict[str, tuple[float, float]]


class SchedulerRope:
    """Per scheduler: the model's scaling, growth, the factors told to the workers, the counters."""

    def __init__(self, rope: EngineRope) -> None:
        self.rope = rope
        self.scaling = rope.scaling
        self.grown = stats.counters(stats.GROWN)
        self.scheduled = stats.counters(stats.SCHEDULED)
        self.overflow = stats.counters(stats.OVERFLOW)
        self.told: dict[str, float] = {}  # the factor each live request's workers know
        self.pending_rerotate: dict[str, tuple[float, float]] = {}

    # --- admission accounting (Scheduler.add_request) -------------------------------------------------

    def added(self, request) -> None:
        state = _state(request)
        self.rope.admitted.add(self.rope.index(state.factor))

    # --- growth (before vLLM schedules) ---------------------------------------------------------------

    def grow(self, scheduler) -> None:
        """Move every growable request the coming step would take past its bucket (module docstring)."""
        now = time.monotonic()
        for request in list(scheduler.running):
            self._maybe_grow(scheduler, request, now, running=True)
        for request in list(scheduler.waiting):
            self._maybe_grow(scheduler, request, now, running=False)

    def _maybe_grow(self, scheduler, request, now: float, *, running: bool) -> None:
        state = _state(request)
        if not state.growable:
            return
        length = request.num_tokens_with_spec + request.num_output_placeholders
        new = grown_factor(state.factor, length, self.scaling)
        if new is None:
            return
        old = state.factor
        if self.scaling.growth == "rerotate":
            if request.num_computed_tokens > 0:
                self.pending_rerotate[request.request_id] = (old, new)
        else:
            self._recompute_at(scheduler, request, state, new, now, running=running)
        state.factor = new
        self.grown.add(self.rope.index(new))
        logger.info("ropeserve: request %s grows from rope factor %s to %s at %d tokens (%s)", request.request_id,
                    old, new, length, self.scaling.growth)

    def _recompute_at(self, scheduler, request, state: RopeState, factor: float, now: float, *,
                      running: bool) -> None:
        if running:
            scheduler.running.remove(request)
            scheduler._preempt_request(request, now)
        elif request.num_computed_tokens > 0:  # a waiting streaming session that keeps its blocks
            scheduler._free_request_blocks(request)
            request.num_computed_tokens = 0
        request.cache_salt = salt_for(state.client_salt, factor)
        request.block_hashes.clear()
        request.update_block_hashes()

    # --- the step's annotation (after vLLM schedules) --------------------------------------------------

    def annotate(self, scheduler, output) -> None:
        requests = scheduler.requests
        told = self.told
        for req_id in output.finished_req_ids:
            told.pop(req_id, None)
        index = self.rope.index
        counts = np.zeros(stats.MAX_BUCKETS, dtype=np.int64)
        factors: dict[str, float] = {}
        for req_id, n in output.num_scheduled_tokens.items():
            request = requests[req_id]
            state = _state(request)
            counts[index(state.factor)] += n
            if told.get(req_id) != state.factor:
                factors[req_id] = told[req_id] = state.factor
            # vLLM's schedule() has already added this step's n tokens to num_computed_tokens
            if state.pinned and not state.overflowed and request.num_computed_tokens > \
                    self.scaling.capacity(state.factor):
                state.overflowed = True
                self.overflow.add(0)
                logger.warning("request %s runs past its rope bucket (factor %s pinned by the request, capacity "
                               "%d tokens)", req_id, state.factor, self.scaling.capacity(state.factor))
        rerotate = {r: self.pending_rerotate.pop(r) for r in list(self.pending_rerotate)
                    if r in output.num_scheduled_tokens}
        self.scheduled.add_all(counts)
        output.ropeserve = RopeStep(factors, rerotate)


def _state(request) -> RopeState:
    state = getattr(request, "ropeserve", None)
    if state is None:
        raise MissingRopeStateError(
            f"request {request.request_id} was not admitted by the ropeserve plugin (EngineCore."
            "preprocess_add_request is not the patched one): refusing to compute it at an unknown scale")
    return state


def scheduler_state(scheduler) -> SchedulerRope | None:
    """The scheduler's state (set when it is built), or None for a model that is not dynamic."""
    return scheduler.__dict__.get("_ropeserve")


def patch_scheduler() -> None:
    """Hook ``Scheduler.__init__`` (the engine core builds its scheduler after loading the plugins, so this
    is where a dynamic model's state is made and a scheduler without our hooks refuses to start),
    ``schedule`` and ``add_request``."""
    from vllm.v1.core.sched.scheduler import Scheduler

    original_init, original_schedule, original_add = Scheduler.__init__, Scheduler.schedule, Scheduler.add_request
    if getattr(original_schedule, "_ropeserve", False):
        return

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        original_init(self, vllm_config, *args, **kwargs)
        model_config = vllm_config.model_config
        scaling = scaling_for_model(model_config)
        if scaling is not None:
            from rope_ext.vllm_plugin.checks import check_scheduler

            check_scheduler(self)
            self._ropeserve = SchedulerRope(EngineRope(scaling, model_config.max_model_len))

    def schedule(self, *args, **kwargs):
        state = scheduler_state(self)
        if state is not None:
            state.grow(self)
        output = original_schedule(self, *args, **kwargs)
        if state is not None:
            state.annotate(self, output)
        return output

    def add_request(self, request) -> None:
        state = scheduler_state(self)
        new = request.request_id not in self.requests
        original_add(self, request)
        if state is not None and new:
            state.added(request)

    for hook, original in ((__init__, original_init), (schedule, original_schedule), (add_request, original_add)):
        hook._ropeserve = True
        hook.__wrapped__ = original
    Scheduler.__init__, Scheduler.schedule, Scheduler.add_request = __init__, schedule, add_request
