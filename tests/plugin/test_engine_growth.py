"""Growth by recompute on the real engine: no request computes a token past its bucket, and prefix caching
keeps working (vLLM's OpenAI server, default model, float32, compiled CPU mode, the plugin's default growth).

Settings, small so that one engine serves the module: L = 250 (``original_max_position_embeddings``),
buckets 1, 2, 4 (capacities 250, 500, 1000 tokens), served context 1000. What is checked:

- A request without a limit of its own (``max_tokens`` the rest of the context: what vLLM fills in when a
  chat request sets none; completions default to 16) grows from 1 to 2 at 251 tokens and from 2 to 4 at
  501, and runs to the end of the context; after each crossing its tokens and
  logprobs equal, exactly, a fresh request of the same tokens at the new scale (the recompute is a fresh
  prefill under the new scale's cache salt). The engine's counters show both growths and no token past
  its bucket's capacity.
- A request whose next ``generation_reserve`` tokens (the look-ahead, scaled down here to 16) would cross L
  starts at 2 and never grows.
- Streaming and ``n > 1`` requests grow the same way (every child of ``n`` is a request of its own).
- Eight chat requests with one shared system prompt of about 300 tokens and no ``max_tokens`` hit the
  prefix cache (vLLM's own counters and each response's ``cached_tokens``), and each equals itself alone
  within the float32 isolation tolerance (see test_engine_fidelity.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.plugin.api_engine import ApiEngine

pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]

L, MAX_FACTOR = 250, 4.0
MAX_MODEL_LEN = int(L * MAX_FACTOR)
PROMPT_LEN = 230
BLOCK = 128  # vLLM CPU's KV block
LOOK_AHEAD = 16  # generation_reserve, scaled down with L: the prompt and its next 16 tokens fit bucket 1
ISOLATION_TOLERANCE = 1e-4
OVERRIDES = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 100000.0, "factor": MAX_FACTOR,
                                 "original_max_position_embeddings": L, "growth": "recompute",
                                 "generation_reserve": LOOK_AHEAD, "buckets": [1.0, 2.0, 4.0]},
             "max_position_embeddings": MAX_MODEL_LEN}


@pytest.fixture(scope="module")
def engine(model_dir):
    args = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--hf-overrides", json.dumps(OVERRIDES),
            "--enable-prompt-tokens-details", "--max-num-seqs", "16"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_ATTN_SPLIT_KV": "0", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    with ApiEngine(model_dir, args, env=env) as running:
        yield running


def counters(engine: ApiEngine) -> dict[str, dict[str, float]]:
    """The engine's counters of interest, by name then factor label ("" when unlabelled)."""
    wanted = {"ropeserve_engine_rope_grown_total", "ropeserve_engine_rope_tokens_past_capacity_total",
              "ropeserve_engine_rope_tokens_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(engine.metrics()):
        for sample in family.samples:
            if sample.name in wanted:
                out.setdefault(sample.name, {})[sample.labels.get("factor", "")] = \
                    out.get(sample.name, {}).get(sample.labels.get("factor", ""), 0.0) + sample.value
    return out


def complete(engine: ApiEngine, prompt: list[int], **body) -> tuple[list[int], list[float], dict]:
    """A greedy completion: (token ids, logprobs, the response)."""
    request = {"model": engine.model, "prompt": prompt, "temperature": 0, "ignore_eos": True, "logprobs": 1,
               "return_tokens_as_token_ids": True, **body}
    response = httpx.post(f"{engine.url}/v1/completions", json=request, timeout=1800)
    assert response.status_code == 200, response.text
    data = response.json()
    logprobs = data["choices"][0]["logprobs"]
    return [int(t.split(":")[1]) for t in logprobs["tokens"]], logprobs["token_logprobs"], data


def test_a_request_without_max_tokens_grows_through_every_bucket(engine, book_tokens):
    prompt = book_tokens[:PROMPT_LEN]
    before = counters(engine)
    # the rest of the context, as vLLM fills in a missing max_tokens (read by the plugin as "not set")
    tokens, logprobs, data = complete(engine, prompt, max_tokens=MAX_MODEL_LEN - PROMPT_LEN)
    after = counters(engine)
    assert len(tokens) == MAX_MODEL_LEN - PROMPT_LEN == data["usage"]["completion_tokens"]
    grown = {f: after["ropeserve_engine_rope_grown_total"][f] - before["ropeserve_engine_rope_grown_total"][f]
             for f in ("2", "4")}
    assert grown == {"2": 1, "4": 1}
    past = after["ropeserve_engine_rope_tokens_past_capacity_total"]
    assert sum(past.values()) == sum(before["ropeserve_engine_rope_tokens_past_capacity_total"].values()) == 0
    # At 251 tokens (21 generated) it moved to 2, at 501 (271 generated) to 4; from there on it is a fresh
    # request of the same tokens at the new scale, token for token and logprob for logprob. (The fresh
    # requests are salted apart: a hit on the grower's cached blocks would compute the same numbers in
    # other chunks, equal only to float32 rounding.)
    for generated, factor in ((21, 2), (271, 4)):
        fresh, fresh_logprobs, _ = complete(engine, prompt + tokens[:generated], max_tokens=16,
                                            vllm_xargs={"rope_factor": factor}, cache_salt=f"fresh-{factor}")
        assert fresh == tokens[generated:generated + 16]
        assert fresh_logprobs == logprobs[generated:generated + 16]
    # and before the first crossing it was the unscaled model: a request pinned at 1 agrees
    pinned, pinned_logprobs, _ = complete(engine, prompt, max_tokens=10, vllm_xargs={"rope_factor": 1},
                                          cache_salt="pinned")
    assert pinned == tokens[:10] and pinned_logprobs == logprobs[:10]


def test_a_request_that_would_cross_within_its_look_ahead_starts_above(engine, book_tokens):
    prompt = book_tokens[8000:8000 + L - LOOK_AHEAD + 6]  # it would cross L at its 7th new token
    before = counters(engine)
    tokens, logprobs, _ = complete(engine, prompt, max_tokens=30)
    after = counters(engine)
    assert after["ropeserve_engine_rope_grown_total"] == before["ropeserve_engine_rope_grown_total"]  # no growth
    assert after["ropeserve_engine_rope_tokens_total"]["2"] > before["ropeserve_engine_rope_tokens_total"].get("2", 0)
    pinned, pinned_logprobs, _ = complete(engine, prompt, max_tokens=30, vllm_xargs={"rope_factor": 2},
                                          cache_salt="pinned-2")
    assert (pinned, pinned_logprobs) == (tokens, logprobs)  # it ran at 2 from its first token


def test_streaming_and_parallel_sampling_grow_too(engine, book_tokens):
    prompt = book_tokens[5000:5000 + PROMPT_LEN]
    before = counters(engine)
    whole, _, _ = complete(engine, prompt, max_tokens=30)
    streamed = []
    request = {"model": engine.model, "prompt": prompt, "temperature": 0, "ignore_eos": True, "max_tokens": 30,
               "stream": True, "logprobs": 1, "return_tokens_as_token_ids": True}
    with httpx.stream("POST", f"{engine.url}/v1/completions", json=request, timeout=900) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += [int(t.split(":")[1]) for t in json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]]
    _, _, parallel = complete(engine, prompt, max_tokens=30, n=2, temperature=0.8, seed=7)
    after = counters(engine)
    assert streamed == whole
    assert len(parallel["choices"]) == 2 and parallel["usage"]["completion_tokens"] == 60
    grown = after["ropeserve_engine_rope_grown_total"]["2"] - before["ropeserve_engine_rope_grown_total"]["2"]
    assert grown == 4  # the whole request, the stream and both children of n=2 each crossed L
    assert sum(after["ropeserve_engine_rope_tokens_past_capacity_total"].values()) == 0


def test_a_shared_system_prompt_hits_the_prefix_cache_and_each_chat_equals_itself_alone(engine, tokenizer,
                                                                                         book_tokens):
    system = tokenizer.decode(book_tokens[20000:20300])
    questions = ["Name one colour.", "What is two plus two?", "Say hello.", "Name a fruit.", "What is the sun?",
                 "Name an animal.", "Count to three.", "Name a city."]

    def chat(question: str) -> dict:
        # no max_tokens (vLLM gives a chat the rest of the context); the answer's first line is enough
        body = {"model": engine.model, "temperature": 0, "logprobs": True, "stop": ["\n"],
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
        response = httpx.post(f"{engine.url}/v1/chat/completions", json=body, timeout=1800)
        assert response.status_code == 200, response.text
        return response.json()

    first = chat(questions[0])  # fills the cache with the shared prefix
    before = counters(engine)
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(chat, questions))
    after = counters(engine)
    alone = [first] + [chat(q) for q in questions[1:]]
    hits = after["vllm:prefix_cache_hits_total"][""] - before["vllm:prefix_cache_hits_total"][""]
    assert hits >= len(questions) * 2 * BLOCK  # at least the 2 full blocks of the system prompt, every request
    for response in together:
        assert 2 * L > response["usage"]["prompt_tokens"] > L  # past L: they share blocks at factor 2
        assert response["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * BLOCK
    for a, b in zip(together, alone):
        lp_a = [t["logprob"] for t in a["choices"][0]["logprobs"]["content"]]
        lp_b = [t["logprob"] for t in b["choices"][0]["logprobs"]["content"]]
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b)) <= ISOLATION_TOLERANCE
