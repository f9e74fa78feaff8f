"""Model-runner side: before every step, write each token's bucket row offset for the rotary modules.

The scheduler decides every request's factor and tells the workers in ``scheduler_output.ropeserve``
(:mod:`.scheduler`); :class:`RunnerRope` keeps what it was told (request id -> bucket index) until the
request finishes. vLLM's V1 ``GPUModelRunner._prepare_inputs`` (``CPUModelRunner`` subclasses it) lays the
scheduled tokens out request by request in ``input_batch`` order; after it runs, :meth:`RunnerRope.fill`
writes ``np.repeat(row_offset_per_request, num_scheduled_tokens)`` into the one offsets buffer every
:class:`PerRequestRotaryEmbedding` of the model reads. No Python code runs per request: the per-request
lookup is ``np.fromiter(map(dict.__getitem__, req_ids))``, the rest is numpy. On a device the offsets
are staged in pinned memory and copied without blocking, as vLLM stages its own inputs. Every prefill
chunk and every decode step of a request therefore uses the scale the scheduler gave it, and the tokens
written at each factor are counted (``ropeserve_engine_rope_tokens_total``, :mod:`.stats`): the evidence
that scaling is applied.

Under ``growth="rerotate"`` the step may also carry re-rotations: before the offsets are written, the
cached keys of those requests are converted to their new scale (:mod:`.regrow`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from rope_ext.vllm_plugin import stats
from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

logger = logging.getLogger("vllm.ropeserve")


class MissingFactorError(RuntimeError):
    """A scheduled request has no factor: the scheduler's hook did not tell the workers (never guessed)."""


class RunnerRope:
    """Per model runner: the rotary modules, their shared offsets buffer, and each live request's bucket."""

    def __init__(self, modules: list[PerRequestRotaryEmbedding], device: torch.device) -> None:
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
        self.computed = stats.counters(stats.COMPUTED)
        self.past = stats.counters(stats.PAST)
        self.capacity = np.array([self.scaling.capacity(b) for b in self.scaling.buckets], dtype=np.int64)
        self.regrower = None  # growth "rerotate": created at the first step (the KV caches exist then)

    def apply(self, runner, scheduler_output) -> None:
        """Take what the scheduler says about this step (new factors, finished requests, re-rotations)."""
        step = getattr(scheduler_output, "ropeserve", None)
        if step is None:
            raise MissingFactorError("the scheduler output carries no ropeserve factors: the plugin's scheduler hook "
                                     "is not in effect, and this step's scale is unknown")
        for req_id in scheduler_output.finished_req_ids:
            self.bucket_of.pop(req_id, None)
        index = self.scaling.buckets.index
        for req_id, factor in step.factors.items():
            self.bucket_of[req_id] = index(factor)
        if step.rerotate:
            from rope_ext.vllm_plugin.regrow import Regrower

            if self.regrower is None:
                self.regrower = Regrower.discover(runner, self.modules[0])
            self.regrower.apply(runner, step.rerotate)

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
        per_token = np.repeat(buckets * self.rows_per_bucket, counts)
        n = per_token.shape[0]
        self.host[:n] = per_token
        if self.staging is not None:
            self.buffer[:n].copy_(self.staging[:n], non_blocking=True)
        n_buckets = len(self.scaling.buckets)
        self.computed.add_all(np.bincount(buckets, weights=counts, minlength=n_buckets).astype(np.int64))
        past = np.minimum(counts, np.maximum(num_computed_tokens[: len(req_ids)] + counts - self.capacity[buckets], 0))
        if past.any():
            self.past.add_all(np.bincount(buckets, weights=past, minlength=n_buckets).astype(np.int64))


def runner_state(runner) -> RunnerRope | None:
    """The runner's state (set by the start-up checks, :mod:`.checks`), or None for a plain model."""
    return runner.__dict__.get("_ropeserve")


def patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_ropeserve", False):
        return

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = original(self, scheduler_output, num_scheduled_tokens)
        state = runner_state(self)
        if state is not None:
            state.apply(self, scheduler_output)
            batch = self.input_batch
            state.fill(batch.req_ids[: batch.num_reqs], num_scheduled_tokens, batch.num_computed_tokens_cpu)
        return result

    _prepare_inputs._ropeserve = True
    _prepare_inputs.__wrapped__ = original
    GPUModelRunner._prepare_inputs = _prepare_inputs
