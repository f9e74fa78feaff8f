"""Installing ropeserve never breaks vLLM: on a vLLM version the plugin does not support, it is inert.

The version check is faked to "unsupported" in every process of the engine (a ``sitecustomize`` on the
child's ``PYTHONPATH`` empties the adapter table before vLLM loads its plugins), on whichever supported vLLM
runs this module (``make test`` runs it on 0.32.0 and 0.34.0). Then a plain model is served as vLLM serves
it (the same tokens as with the plugin active), while a model that asks for the plugin (a dynamic rope type,
or its own ``yarn`` with ``ROPESERVE_DYNAMIC_ROPE=1``) is refused at start-up with a message naming the
supported versions, instead of running with a scale nobody applies. Eager engines, default model.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline

pytestmark = pytest.mark.engine

L = 8192
DYNAMIC = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 100000.0, "factor": 2.0,
                               "original_max_position_embeddings": L}}
YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 2.0,
                            "original_max_position_embeddings": L}, "max_position_embeddings": 2 * L}
PROMPT = Request(prompt_token_ids=list(range(100, 164)), max_tokens=6)


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory):
    """PYTHONPATH for a child whose plugin believes the installed vLLM unsupported."""
    folder = tmp_path_factory.mktemp("unsupported")
    (folder / "sitecustomize.py").write_text(
        "import rope_ext.vllm_plugin.versions as versions\nversions.ADAPTERS.clear()\n")
    return str(folder)


def _spec(model_dir, core, hf_overrides=None, **env):
    return EngineSpec(model=model_dir, dtype="float32", max_model_len=2048, hf_overrides=hf_overrides,
                      kv_cache_gib=1, max_num_seqs=4, env={"VLLM_CPU_OMP_THREADS_BIND": str(core), **env})


def _outcome(spec):
    try:
        return run_offline(spec, [[PROMPT]], timeout=900)[0][0]
    except RuntimeError as exc:
        return str(exc)


@pytest.fixture(scope="module")
def outcomes(model_dir, unsupported):
    specs = {
        "plain, unsupported": _spec(model_dir, 0, PYTHONPATH=unsupported),
        "plain, supported": _spec(model_dir, 1),
        "dynamic, unsupported": _spec(model_dir, 0, DYNAMIC, PYTHONPATH=unsupported),
        "switch, unsupported": _spec(model_dir, 1, YARN, PYTHONPATH=unsupported, ROPESERVE_DYNAMIC_ROPE="1"),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_outcome, spec) for name, spec in specs.items()}
        return {name: future.result() for name, future in futures.items()}


def test_a_plain_model_is_served_as_vllm_serves_it(outcomes):
    inert, active = outcomes["plain, unsupported"], outcomes["plain, supported"]
    assert not isinstance(inert, str), inert[-3000:]
    assert inert.token_ids == active.token_ids and inert.logprobs == active.logprobs


@pytest.mark.parametrize("case", ["dynamic, unsupported", "switch, unsupported"])
def test_a_model_that_asks_for_the_plugin_is_refused_naming_the_supported_versions(outcomes, case):
    outcome = outcomes[case]
    assert isinstance(outcome, str), "the engine started and served a request no one would scale"
    assert "per-request RoPE scaling needs vLLM 0.32.0, 0.33.0, 0.34.0" in outcome
