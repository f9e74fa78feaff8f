"""The one decider, on the real engine core: every request is admitted where it enters the engine core,
whichever way it comes; a request pinned to a bucket never computes a token past its capacity; and the
engine's counters prove the scale is applied, so a broken hook shows.

The engine runs in one child process (vLLM's in-process engine core, tests/plugin/engine_core_child.py)
so that its scheduler can be read and the plugin's fill disabled on purpose (default model, float32,
L = 1000, factor 4); the admission run is shared by the tests that read it. A streaming-input session is
checked on the engine core's own entry point with the scheduler standing in as the one dict it reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

CHILD = Path(__file__).with_name("engine_core_child.py")


def _child(model_dir: str, what: str, tmp_path: Path) -> dict:
    env = {**os.environ, "ROPESERVE_METRICS_DIR": str(tmp_path / "metrics")}  # its counters alone
    result = subprocess.run([sys.executable, str(CHILD), model_dir, what], capture_output=True, text=True,
                            timeout=900, cwd=Path(__file__).resolve().parents[2], env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the engine child failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def admission_run(model_dir, tmp_path_factory) -> dict:
    return _child(model_dir, "admission", tmp_path_factory.mktemp("admission"))


def test_a_request_submitted_to_the_engine_core_directly_is_admitted_as_through_the_api(admission_run):
    """An EngineCoreRequest added to the engine core (no InputProcessor, no OpenAI front-end) gets the same
    factor, cache salt and block hashes as the same prompt through vLLM's own front-end."""
    out = admission_run
    assert out["api"]["factor"] == out["direct"]["factor"] == 2.0
    assert out["api"]["cache_salt"] == out["direct"]["cache_salt"] == "|ropeserve-rope-factor=2.0"
    assert out["api"]["block_hashes"] == out["direct"]["block_hashes"]
    assert out["counters"]["scheduled"] == out["counters"]["computed"]


def test_block_hashes_precomputed_by_a_front_end_still_get_the_scales_salt(admission_run):
    """vLLM 0.34 lets a front-end send a prompt's block hashes (EngineCoreRequest.block_hashes), computed
    under the salt it knew. The engine core would use them as they are, so a factor-2 request would share
    its blocks with factor-1 requests; admission drops them when it salts the request, and the blocks are
    hashed under the scale's salt, as the same prompt's through the API."""
    if "frontend_hashed" not in admission_run:
        pytest.skip("this vLLM (before 0.34) has no front-end block hashes: the engine core always hashes")
    hashed = admission_run["frontend_hashed"]
    assert hashed["factor"] == 2.0 and hashed["cache_salt"] == "|ropeserve-rope-factor=2.0"
    assert hashed["block_hashes"] == admission_run["api"]["block_hashes"]
    assert hashed["block_hashes"] != hashed["sent"]


def test_a_pinned_request_past_its_bucket_is_refused(admission_run):
    """Issue 21: rope_factor 1 holds L = 1000 tokens; 990 + 20 is refused with the policy's message, by the
    front-end (vLLM's VLLMValidationError: a 400 on its OpenAI server) and by the engine core for a request
    sent to it directly; neither is admitted."""
    pinned = admission_run["pinned"]
    message = ("This request's rope_factor 1 holds at most 1000 tokens; the prompt (990 tokens) plus max_tokens (20) "
               "is 1010. Reduce the length of the prompt or max_tokens, or ask for a larger rope_factor or none.")
    assert pinned["refused"] == {"message": message, "parameter": "max_tokens"}
    assert pinned["direct_refused"] == message
    assert "direct-over" not in pinned["admitted"]


def test_a_pinned_request_without_max_tokens_stops_at_its_bucket(admission_run):
    """The same prompt without max_tokens generates 10 tokens and finishes with reason length: 1000 tokens
    in all, the capacity of factor 1; sent to the engine core directly with vLLM's fill-in (max_tokens 3010),
    it is capped alike. No token of any request was computed past its bucket."""
    pinned = admission_run["pinned"]
    assert pinned["capped"] == {"finish_reason": "length", "prompt": 990, "generated": 10}
    assert pinned["direct_capped"] == 10
    assert sum(admission_run["counters"]["past"]) == 0  # the workers' count of positions past a bucket


WHERE = {"broken": "wrote no per-request offsets for the probe's tokens: its step layout is not the one",
         "bypassed": "these rotary modules ignore the per-request offsets when called: "
                     "model.layers.0.self_attn.rotary_emb, model.layers.1.self_attn.rotary_emb, "
                     "model.layers.2.self_attn.rotary_emb and 27 more"}


@pytest.mark.parametrize("how", ["broken", "bypassed"])
def test_offsets_that_never_reach_rope_are_refused_at_start_up_by_the_probe(model_dir, tmp_path, how):
    """``broken``: the runner's fill disabled (as a vLLM change that skipped it would), so the offsets stay at
    bucket 0; ``bypassed``: the offsets are written, but the rotary modules read the table at the raw
    positions (as a fused kernel handed ``cos_sin_cache`` and the positions would). Either way the start-up
    probe's two requests (factors 1 and 4) come out the same, and the engine never starts, with the place the
    offsets were lost: the runner, or the layers by name. (Before the probe, such an engine served at plain
    RoPE, and only its counters, or nothing, showed it.)"""
    env = {**os.environ, "ROPESERVE_METRICS_DIR": str(tmp_path / "metrics")}
    result = subprocess.run([sys.executable, str(CHILD), model_dir, how], capture_output=True, text=True,
                            timeout=900, cwd=Path(__file__).resolve().parents[2], env=env)
    assert "RESULT " not in result.stdout
    output = result.stdout + result.stderr
    assert "start-up probe: the same 64-token prompt at factor 1 and at factor 4 gave identical logprobs" in output
    assert WHERE[how] in output


def test_a_streaming_sessions_later_chunks_keep_its_scale(hasher_and_rope):
    """The first chunk of a resumable session is admitted; a later chunk (same request id, the session in
    the scheduler) is not re-admitted on its own length: the session's scale stays the session's."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.core import EngineCore

    hasher, rope = hasher_and_rope
    calls = []

    def chunk(n: int) -> EngineCoreRequest:
        return EngineCoreRequest(request_id="session", prompt_token_ids=list(range(n)), mm_features=None,
                                 sampling_params=SamplingParams(max_tokens=4), pooling_params=None, arrival_time=0.0,
                                 lora_request=None, cache_salt=None, data_parallel_rank=None, resumable=True)

    scheduler = types.SimpleNamespace(requests={}, _ropeserve=rope)
    core = types.SimpleNamespace(scheduler=scheduler, mm_receiver_cache=None, request_block_hasher=hasher,
                                 vllm_config=types.SimpleNamespace(watermark_config=None),  # read by 0.34
                                 prefix_hash_config=None)
    first, _ = EngineCore.preprocess_add_request(core, chunk(100))
    calls.append(first.ropeserve.factor)
    scheduler.requests["session"] = first
    later_request = chunk(3000)  # on its own length it would need factor 4
    later, _ = EngineCore.preprocess_add_request(core, later_request)
    assert calls == [1.0] and not hasattr(later, "ropeserve")
    assert later_request.cache_salt is None and "rope_factor" not in (later_request.sampling_params.extra_args or {})


@pytest.fixture
def hasher_and_rope(tmp_path, monkeypatch):
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    from rope_ext import RopeScaling
    from rope_ext.vllm_plugin import register
    from rope_ext.vllm_plugin.admission import EngineRope
    from rope_ext.vllm_plugin.scheduler import SchedulerRope

    monkeypatch.setenv("ROPESERVE_METRICS_DIR", str(tmp_path))
    register()
    init_none_hash(sha256_cbor)
    scaling = RopeScaling(method="dynamic_yarn", original_max_position=1000, max_factor=4.0)
    return get_request_block_hasher(16, sha256_cbor), SchedulerRope(EngineRope(scaling, 4000))
