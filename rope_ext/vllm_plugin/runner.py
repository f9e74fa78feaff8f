"""Model-runner side: before every step, write each token's bucket row offset for the rotary modules.

vLLM's V1 ``GPUModelRunner._prepare_inputs`` (``CPUModelRunner`` subclasses it) lays the scheduled
tokens out request by request in ``input_batch`` order. After it runs, we look up each request's factor
(``sampling_params.extra_args["rope_factor"]``, decided at admission; the same policy is applied here
when a request lacks it) and fill ``token_offsets`` of every :class:`PerRequestRotaryEmbedding` with
``np.repeat(row_offset_per_request, num_scheduled_tokens)``. Every prefill chunk and every decode step
of a request therefore uses its one scale. A request that grows past its bucket keeps its scale (the
first time, a warning is logged), unless the model says ``growth: "rerotate"``: then, before the offsets
are written, :mod:`.regrow` moves it to a larger bucket and re-rotates its cached keys.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from rope_ext import choose_factor
from rope_ext.vllm_plugin.admission import CAPACITY_KEY, FACTOR_KEY, requested_max_tokens
from rope_ext.vllm_plugin.regrow import grow_requests
from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

logger = logging.getLogger("vllm.ropeserve")


class RunnerRopeState:
    """Per-model-runner state: the rotary modules to feed and requests already seen overflowing."""

    def __init__(self, modules: list[PerRequestRotaryEmbedding], max_model_len: int) -> None:
        self.modules = modules
        self.max_model_len = max_model_len
        self.overflowed: set[str] = set()

    @classmethod
    def discover(cls, runner) -> RunnerRopeState:
        seen: dict[int, PerRequestRotaryEmbedding] = {}
        for module in runner.get_model().modules():
            if isinstance(module, PerRequestRotaryEmbedding):
                seen.setdefault(id(module), module)
        return cls(list(seen.values()), runner.model_config.max_model_len)

    def factor_of(self, req_id: str, request_state) -> float:
        params = request_state.sampling_params
        extra = (params.extra_args or {}) if params is not None else {}
        factor = extra.get(FACTOR_KEY)
        if factor is None:  # not admitted through InputProcessor: apply the same policy here
            prompt_len = len(request_state.prompt_token_ids or ())
            max_tokens = params.max_tokens if params is not None else None
            factor = choose_factor(prompt_len, requested_max_tokens(prompt_len, max_tokens, self.max_model_len),
                                   self.modules[0].scaling)
            if params is not None:
                params.extra_args = {**extra, FACTOR_KEY: factor,
                                     CAPACITY_KEY: self.modules[0].scaling.capacity(factor)}
        return factor

    def fill(self, runner, num_scheduled_tokens: np.ndarray) -> None:
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        module = self.modules[0]
        offsets = np.empty(num_reqs, dtype=np.int64)
        for i, req_id in enumerate(req_ids):
            state = runner.requests[req_id]
            factor = self.factor_of(req_id, state)
            offsets[i] = module.row_offset(factor)
            end = int(batch.num_computed_tokens_cpu[i]) + int(num_scheduled_tokens[i])
            capacity = module.scaling.capacity(factor)
            if end > capacity and req_id not in self.overflowed:
                self.overflowed.add(req_id)
                logger.warning("request %s outgrew its rope bucket (factor %s, capacity %d tokens) and keeps "
                               "its scale", req_id, factor, capacity)
        if self.overflowed:
            self.overflowed.intersection_update(runner.requests)
        token_offsets = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens[:num_reqs]))
        n = token_offsets.shape[0]
        for m in self.modules:
            m.token_offsets[:n].copy_(token_offsets, non_blocking=True)


def patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_ropeserve", False):
        return

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = original(self, scheduler_output, num_scheduled_tokens)
        state = self.__dict__.get("_ropeserve_state")
        if state is None:
            state = self._ropeserve_state = RunnerRopeState.discover(self)
        if state.modules:
            grow_requests(self, state.modules[0], num_scheduled_tokens, factor_key=FACTOR_KEY)  # growth "rerotate"
            state.fill(self, num_scheduled_tokens)
        return result

    _prepare_inputs._ropeserve = True
    _prepare_inputs.__wrapped__ = original
    GPUModelRunner._prepare_inputs = _prepare_inputs
