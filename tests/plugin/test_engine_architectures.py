"""The plugin's promise on the architectures people serve, on the real engine in vLLM's compiled CPU mode.

For each tiny random model of :mod:`tests.plugin.tiny_models` (Qwen2, Qwen3, Mistral, Gemma 3 with local
and global layers, Phi-3 with a partial rotary dimension, Qwen3-MoE), float32, compiled (no ``enforce_eager``), three
engines with the same ``max_model_len``: stock vLLM with plain RoPE, stock vLLM with static YaRN at
factor 2, and the plugin (dynamic YaRN up to 4 x L). Short prompts (at most L with their new tokens) must
equal the unscaled engine, a 400-token prompt (factor 2) must equal static YaRN x2, exactly, token for token
and logprob for logprob; the three together in one batch equal themselves alone within the float32
isolation tolerance (see test_engine_fidelity.py). For Gemma 3 the oracle scales only the global layers,
as its config does, so scaling a local layer too would show. An architecture without a fidelity test
(Granite) is served, with a warning that its fidelity is unproven.

Tensor parallelism: the Qwen2 plugin engine, eager, with ``tensor_parallel_size`` 1 and 2 (vLLM's
multiprocessing executor, one worker per core; each rank holds one of the two attention heads and its own rotary modules
and offsets buffer) runs the same mixed batch (factors 1, 1 and 2 in one step, plus a short prompt forced
to 4): each request equals the TP 1 engine's within the isolation tolerance (the sums of a row-parallel
layer are split across ranks and added in another order).

The engines run in one process each (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's in-process engine core
and executor, the same scheduler, model runner and compiled model) so that they start in half the time;
the default model's fidelity (test_engine_fidelity.py) runs vLLM's default process layout. Two engines
run at a time, one per core.
"""

from __future__ import annotations

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.offline import EngineSpec, Request, run_offline
from tests.plugin.tiny_models import ARCHITECTURES, L, build, rope_parameters

pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]

MAX_MODEL_LEN = 4 * L
SHORT_LENGTHS = (100, 240)  # + 8 new tokens <= L: factor 1
LONG_LENGTH = 400  # + 8: factor 2
NEW_TOKENS = 8
ISOLATION_TOLERANCE = 1e-4


def _spec(model: str, core: int, hf_overrides, **env) -> EngineSpec:
    return EngineSpec(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, hf_overrides=hf_overrides,
                      kv_cache_gib=1, max_num_seqs=8,
                      env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
                      extra={"enforce_eager": False, "skip_tokenizer_init": True})


def _jobs(arch: str, folder: str):
    rng = random.Random(arch)
    tokens = [rng.randrange(512) for _ in range(LONG_LENGTH)]
    shorts = [Request(prompt_token_ids=tokens[i:i + n], max_tokens=NEW_TOKENS) for i, n in enumerate(SHORT_LENGTHS)]
    long = Request(prompt_token_ids=tokens, max_tokens=NEW_TOKENS)
    mixed = [dataclasses.replace(r, cache_salt="mixed") for r in [*shorts, long]]
    return {
        "plugin": (lambda core: _spec(folder, core, rope_parameters(arch, "dynamic_yarn", 4.0)),
                   [[r] for r in [*shorts, long]] + [mixed]),
        "stock": (lambda core: _spec(folder, core, {"max_position_embeddings": MAX_MODEL_LEN},
                                     VLLM_ALLOW_LONG_MAX_MODEL_LEN="1"), [[r] for r in shorts]),
        "yarn2": (lambda core: _spec(folder, core, rope_parameters(arch, "yarn", 2.0) | {
            "max_position_embeddings": MAX_MODEL_LEN}), [[long]]),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {arch: str(build(arch, tmp_path_factory.mktemp(arch) / "model")) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def runs(folders):
    work = [(arch, name, make, batches) for arch in ARCHITECTURES
            for name, (make, batches) in _jobs(arch, folders[arch]).items()]
    results: dict[str, dict[str, list]] = {arch: {} for arch in ARCHITECTURES}
    with ThreadPoolExecutor(2) as pool:
        futures = [(arch, name, pool.submit(_run, make, batches, i % 2))
                   for i, (arch, name, make, batches) in enumerate(work)]
        for arch, name, future in futures:
            results[arch][name] = future.result()
    return results


def _run(make, batches, core: int):
    return run_offline(make(core), batches, timeout=1500)


TP_ARCH = "Qwen2ForCausalLM"


@pytest.fixture(scope="module")
def tensor_parallel(folders):
    """The mixed batch plus a short prompt forced to the largest bucket, on the TP 1 and TP 2 plugin engines,
    one after the other (the TP 2 engine takes both cores; its test comes last, after ``runs``)."""
    shorts_and_long = [b[0] for b in _jobs(TP_ARCH, folders[TP_ARCH])["plugin"][1][:-1]]
    batch = [dataclasses.replace(r, cache_salt="tp") for r in shorts_and_long]
    batch.append(dataclasses.replace(batch[0], extra_args={"rope_factor": 4}, cache_salt="tp-4"))
    spec = dataclasses.replace(_spec(folders[TP_ARCH], 0, rope_parameters(TP_ARCH, "dynamic_yarn", 4.0)),
                               extra={"enforce_eager": True, "skip_tokenizer_init": True})  # eager: shorter starts
    tp2 = dataclasses.replace(spec, env={**spec.env, "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                              extra={**spec.extra, "tensor_parallel_size": 2, "distributed_executor_backend": "mp"})
    (one,), counters = run_offline(spec, [batch], timeout=1500, counters=True)
    (two,), counters2 = run_offline(tp2, [batch], timeout=1500, counters=True)
    return {"tp1": one, "tp2": two, "counters": [counters, counters2]}


def _exact(a, b) -> bool:
    return a.token_ids == b.token_ids and a.logprobs == b.logprobs


def _close(a, b) -> bool:
    return a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= ISOLATION_TOLERANCE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_short_requests_equal_the_unscaled_model(runs, arch):
    plugin, stock = runs[arch]["plugin"], runs[arch]["stock"]
    for i, n in enumerate(SHORT_LENGTHS):
        assert plugin[i][0].num_prompt_tokens == n
        assert _exact(plugin[i][0], stock[i][0]), (arch, n)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_long_request_equals_static_yarn_at_its_factor(runs, arch):
    plugin, yarn = runs[arch]["plugin"][len(SHORT_LENGTHS)][0], runs[arch]["yarn2"][0][0]
    assert plugin.num_prompt_tokens == LONG_LENGTH
    assert _exact(plugin, yarn)
    unscaled_tokens = runs[arch]["plugin"][0][0].token_ids  # a sanity check that scale matters at all
    assert plugin.logprobs != runs[arch]["stock"][0][0].logprobs or plugin.token_ids != unscaled_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_request_in_a_mixed_batch_equals_itself_alone(runs, arch):
    plugin = runs[arch]["plugin"]
    alone, mixed = [b[0] for b in plugin[:-1]], plugin[-1]
    assert all(_close(m, a) for m, a in zip(mixed, alone))


def test_an_unproven_architecture_is_served_with_a_warning(tmp_path):
    """Granite (vLLM's own granite.py on every supported version, built on get_rope; no fidelity test): served,
    after the start-up probe, at the scale its length needs."""
    import torch
    import transformers

    folder = tmp_path / "granite"
    config = transformers.GraniteConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=512,
                                        max_position_embeddings=L, architectures=["GraniteForCausalLM"])
    torch.manual_seed(0)
    transformers.GraniteForCausalLM(config).save_pretrained(folder)
    dynamic = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": L}, "max_position_embeddings": MAX_MODEL_LEN}
    (result,), = run_offline(dataclasses.replace(_spec(str(folder), 0, dynamic),
                                                 extra={"enforce_eager": True, "skip_tokenizer_init": True}),
                             [[Request(prompt_token_ids=list(range(3, 303)), max_tokens=1)]], timeout=900)
    assert len(result.token_ids) == 1 and result.num_prompt_tokens == 300


def test_tensor_parallel_2_equals_tensor_parallel_1_with_mixed_scales_in_a_batch(tensor_parallel):
    one, two = tensor_parallel["tp1"], tensor_parallel["tp2"]
    assert [r.num_prompt_tokens for r in two] == [*SHORT_LENGTHS, LONG_LENGTH, SHORT_LENGTHS[0]]
    assert all(_close(a, b) for a, b in zip(two, one))
    # the forced request really ran at another scale than the same prompt at factor 1, on both engines
    assert one[-1].logprobs != one[0].logprobs and two[-1].logprobs != two[0].logprobs
    # both engines counted the same computed tokens at each bucket (the probe's included)
    tp1_counts, tp2_counts = tensor_parallel["counters"]
    assert tp1_counts["computed"] == tp2_counts["computed"]
