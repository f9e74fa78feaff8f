"""The start-up proof on the real engine: a dynamic model whose scale does not reach RoPE never serves.

A ``sitecustomize`` on the engine's ``PYTHONPATH`` makes the plugin's rotary module ignore its offsets in
every engine process (what a compiled graph cached without the plugin, or a fused kernel reading
``cos_sin_cache`` with the raw positions, amount to): the default model, an architecture the fidelity
tests cover, is refused at start-up by the probe (rope_ext.vllm_plugin.probe), which names the causes,
before any request. The same engine without the sabotage starts and serves (as every dynamic engine of the
suite does, each after passing the probe). Eager and compiled, so the probe sees the graph that runs in
both modes. (The runner's fill disabled is the engine-core module's case.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline

pytestmark = pytest.mark.engine

L = 8192
DYNAMIC = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 100000.0, "factor": 2.0,
                               "original_max_position_embeddings": L}}


@pytest.fixture(scope="module")
def bypassed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bypassed")
    # Applied when vLLM registers the plugin in each process (importing vLLM from sitecustomize is too early).
    (folder / "sitecustomize.py").write_text(
        "import rope_ext.vllm_plugin as plugin\n"
        "_register = plugin.register\n"
        "def register():\n"
        "    _register()\n"
        "    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding\n"
        "    PerRequestRotaryEmbedding._offset = lambda self, positions: positions\n"
        "plugin.register = register\n")
    return str(folder)


def _outcome(model_dir, core, eager, **env):
    spec = EngineSpec(model=model_dir, dtype="float32", max_model_len=2048, hf_overrides=DYNAMIC, kv_cache_gib=1,
                      max_num_seqs=4, env={"VLLM_CPU_OMP_THREADS_BIND": str(core), **env},
                      extra={"enforce_eager": eager})
    try:
        return run_offline(spec, [[Request(prompt_token_ids=list(range(100, 132)), max_tokens=2)]], timeout=900)
    except RuntimeError as exc:
        return str(exc)


@pytest.fixture(scope="module")
def outcomes(model_dir, bypassed):
    with ThreadPoolExecutor(2) as pool:
        futures = {
            "bypassed, eager": pool.submit(_outcome, model_dir, 0, True, PYTHONPATH=bypassed),
            "bypassed, compiled": pool.submit(_outcome, model_dir, 1, False, PYTHONPATH=bypassed),
            "intact, eager": pool.submit(_outcome, model_dir, 0, True),
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_offsets_that_do_not_reach_rope_are_refused_at_start_up(outcomes, mode):
    outcome = outcomes[f"bypassed, {mode}"]
    assert isinstance(outcome, str), "the engine served a dynamic model whose offsets never reach RoPE"
    assert "start-up probe" in outcome and "gave identical logprobs" in outcome
    assert "does not reach RoPE in the graph this engine runs" in outcome
    assert "compiled graph cached" in outcome and "fused kernel" in outcome


def test_the_same_engine_with_the_plugin_intact_starts_and_serves(outcomes):
    outcome = outcomes["intact, eager"]
    assert not isinstance(outcome, str), outcome[-3000:]
    assert len(outcome[0][0].token_ids) == 2
