"""vLLM's compile cache and the plugin: warm starts reload, and a dynamic model never runs a plain model's graph.

A tiny random Qwen2 whose config says ``yarn`` x4 (L = 256), vLLM's compiled CPU mode, float32. The engines
share one ``VLLM_CACHE_ROOT`` (a fresh directory) and start one after the other, as a user's would:

1. ``plain``: ``ROPESERVE_DYNAMIC_ROPE`` unset: stock static YaRN x4, compiled and saved to the AOT cache.
2. ``dynamic``: the switch on, same cache root. vLLM's own cache key does not change with the switch (the
   config file says ``yarn`` either way); the plugin's settings in it do (``checks.key_compile_cache``), so
   the plain graph is not loaded: no AOT artifact loaded, and every request equals the ``oracle`` (the same
   dynamic engine compiled with ``VLLM_DISABLE_COMPILE_CACHE=1``) exactly.
3. ``warm``: the same dynamic engine again. It loads 2's artifact (vLLM's counter says one; on vLLM's CPU
   backend every reload failed and compiled again until ``rope_ext.vllm_plugin.aot_reload``) and serves the
   same numbers, bit for bit.
4. ``stale``: the plain engine's artifact planted over the dynamic one's (a cache entry that does not apply
   the offsets, as a reload across a key change would be): the start-up probe refuses the engine, and says
   the graph is to blame (the runner wrote the offsets, every rotary module applies them when called).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.tiny_models import L, build, rope_parameters

pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]

ARCH = "Qwen2ForCausalLM"
MAX_MODEL_LEN = 4 * L


def _spec(folder: str, cache: Path, core: int = 0, **env) -> EngineSpec:
    return EngineSpec(model=folder, dtype="float32", max_model_len=MAX_MODEL_LEN,
                      hf_overrides=rope_parameters(ARCH, "yarn", 4.0) | {"max_position_embeddings": MAX_MODEL_LEN},
                      kv_cache_gib=1, max_num_seqs=4,
                      env={"VLLM_CACHE_ROOT": str(cache), "VLLM_CPU_OMP_THREADS_BIND": str(core),
                           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
                      extra={"enforce_eager": False, "skip_tokenizer_init": True})


def _artifacts(cache: Path) -> dict[str, Path]:
    """The saved compiled models, by cache key."""
    return {p.parents[1].name: p for p in cache.glob("torch_compile_cache/torch_aot_compile/*/rank_*/model")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(build(ARCH, tmp_path_factory.mktemp("qwen2") / "model"))
    cache = tmp_path_factory.mktemp("vllm-cache")
    batches = [[Request(prompt_token_ids=list(range(7, 107)), max_tokens=8)],
               [Request(prompt_token_ids=[(5 + 3 * i) % 512 for i in range(400)], max_tokens=8)]]
    out = {}

    def start(name: str, core: int = 0, **env) -> None:
        out[name], counters = run_offline(_spec(folder, cache, core, **env), batches, timeout=1500, counters=True)
        out[name + "_loaded"] = counters["aot_artifacts_loaded"][0]

    with ThreadPoolExecutor(1) as pool:  # the oracle on core 1, beside the sequence on core 0
        oracle = pool.submit(start, "oracle", 1, ROPESERVE_DYNAMIC_ROPE="1", VLLM_DISABLE_COMPILE_CACHE="1")
        start("plain")
        plain_keys = set(_artifacts(cache))
        start("dynamic", ROPESERVE_DYNAMIC_ROPE="1")
        artifacts = _artifacts(cache)
        dynamic_keys = set(artifacts) - plain_keys
        out["keys"] = (plain_keys, dynamic_keys)
        start("warm", ROPESERVE_DYNAMIC_ROPE="1")
        (plain_key,), (dynamic_key,) = plain_keys, dynamic_keys
        shutil.copyfile(artifacts[plain_key], artifacts[dynamic_key])
        try:
            start("stale", ROPESERVE_DYNAMIC_ROPE="1")
        except RuntimeError as exc:
            out["stale_error"] = str(exc)
        oracle.result()
    return out


def _exact(a, b) -> bool:
    return a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_a_dynamic_start_never_loads_the_plain_models_graph(runs):
    plain_keys, dynamic_keys = runs["keys"]
    assert len(plain_keys) == 1 and len(dynamic_keys) == 1  # a key of its own, saved beside the plain one
    assert runs["plain_loaded"] == 0 and runs["dynamic_loaded"] == 0
    for got, want in zip(runs["dynamic"], runs["oracle"]):
        assert _exact(got[0], want[0])
    assert runs["dynamic"][0][0].logprobs != runs["plain"][0][0].logprobs  # the short prompt: unscaled, not x4


def test_a_second_start_reloads_the_compiled_model_and_serves_the_same_numbers(runs):
    assert runs["warm_loaded"] == 1
    for got, want in zip(runs["warm"], runs["dynamic"]):
        assert _exact(got[0], want[0])


def test_a_stale_artifact_that_ignores_the_offsets_is_refused_by_the_probe(runs):
    assert "stale" not in runs, "the engine served from a graph without the plugin's offsets"
    assert "start-up probe" in runs["stale_error"] and "identical logprobs" in runs["stale_error"]
    # and where: the runner wrote the offsets and the modules apply them, so the graph is to blame
    assert "the graph that ran does not call them with the offsets" in runs["stale_error"]
