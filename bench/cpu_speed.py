"""Benchmark: the default set-up against stock vLLM's best flags and llama.cpp, on this CPU, in one run.

Each engine is a server started the way its users start it, one after the other on the same machine,
measured through the OpenAI API with the same prompts (cut from ``shared/data/books``) and the same
client:

- ``before``: ``ropeserve serve`` as it was: bfloat16 on every CPU (``ROPESERVE_ENGINE_DTYPE=bfloat16``) and
  a compile at every start (``VLLM_DISABLE_COMPILE_CACHE=1``: vLLM's AOT cache did not reload on CPU);
- ``after``: ``ropeserve serve`` as it is (dtype by the CPU, :mod:`server.cpu_dtype`; the compiled model
  reloaded from vLLM's cache): started once cold, then again, and measured on the warm start;
- ``after, both cores``: the same with the worker's OpenMP threads bound to every core
  (``VLLM_CPU_OMP_THREADS_BIND=0-1`` on two cores) instead of vLLM's default (``auto``: on x86 one core is
  left to the other processes: the gateway, vLLM's API server and its engine core's loop);
- ``after, no health checks``: ``after`` with the gateway's health checks of its engine (``GET /health``
  and ``/metrics`` every ``health_interval_s``, 2 s) an hour apart: what they cost the engine (a diagnosis,
  not a set-up to run);
- ``stock vLLM``: vLLM's OpenAI server with static YaRN x8 (what a user of stock vLLM runs for a 64k
  context) and its best flags for this CPU: compiled, the dtype this CPU runs fastest and the worker's cores
  as ``after`` chooses them (:mod:`server.cpu_cores`: every core of a small machine, where vLLM's own default
  leaves one out); the plugin is not loaded (``VLLM_PLUGINS``);
- ``llama.cpp``: llama-cpp-python's server on the same GGUF the default model is made from (Q4_1), static
  YaRN x8 (``rope_freq_scale`` 1/8 over the original 8,192 tokens), a 65,536-token context, both cores,
  flash attention, no logits kept for the prompt (its server keeps them all by default), 2,048-token batches,
  concurrent requests queued (by default a new request cancels the running one; the server runs one at a time).
  Its environment is ``.venv-llama`` (``scripts/setup_llamacpp.sh``, run here when it is missing).

Measured per engine: start-up (process start to ready), TTFT and prompt tokens/s at 2k and 16k prompt
tokens (one streamed request, one new token), decode tokens/s with 1 and 16 running requests (64-token
prompts, 128 new tokens each, streamed: generated tokens after the first / time from the first token to
the last), the machine's peak memory above idle while the engine ran, and for ropeserve the README's
passkey self-checks (``/healthz/passkey?len=4096`` and at the longer prefill length), timed as a user sees
them, and decode again straight to the gateway's engine (``decode_*_engine_only``: the gateway's share)::

    python bench/cpu_speed.py                  # about 15 minutes on two cores
    python bench/cpu_speed.py --quick          # 2k and 8k prompts, 32 new tokens
    python bench/cpu_speed.py --engines after llama.cpp
    python bench/cpu_speed.py --engines after "stock vLLM" --decode-only --rounds 3   # an interleaved A/B

With ``--rounds N`` the engines run N times in turn (A B A B ...), each keeping its own vLLM cache (so
``after`` is started cold once, in the first round); every round's table is printed, then the medians.

Printed: one row per measure, one column per engine, and the ratios after/before, after/stock vLLM and
llama.cpp/after, quiet/after and quiet/stock (rates: above 1 the first is faster; start-up and TTFT are
times, below 1 is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.compile_modes import MemoryPeak  # noqa: E402
from server.cpu_cores import allowed_cpus, worker_binding  # noqa: E402
from server.cpu_dtype import choose_cpu_dtype, read_cpu_flags  # noqa: E402
from server.default_model import MODEL_NAME, gguf_path, prepare  # noqa: E402
from server.engine_process import EngineProcess, free_port  # noqa: E402

L, FACTOR, THETA = 8192, 8, 100000.0
GATEWAYS = ("before", "after", "after, both cores", "after, no health checks")  # `ropeserve serve`, the passkey route included
ENGINES = (*GATEWAYS, "stock vLLM", "llama.cpp")
BOTH_CORES = f"0-{os.cpu_count() - 1}"
LLAMA_VENV = REPO / ".venv-llama"


def yarn_overrides(rope_type: str = "yarn") -> dict:
    """The default model's RoPE at x8 as ``hf_overrides``: static YaRN, or the plugin's ``dynamic_yarn``."""
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": THETA, "factor": float(FACTOR),
                                "original_max_position_embeddings": L}, "max_position_embeddings": L * FACTOR}


def engine(name: str, *, model_dir: Path, dtype: str, cache: Path, log: IO[bytes]) -> tuple[EngineProcess, str | None]:
    """Engine ``name`` (one of :data:`ENGINES`) on a free port, not started, and for the gateway its own
    vLLM server's URL."""
    port, engine_url = free_port(), None
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"), "ROPESERVE_API_KEYS": ""}
    if name in GATEWAYS:
        if name == "before":
            env |= {"ROPESERVE_ENGINE_DTYPE": "bfloat16", "VLLM_DISABLE_COMPILE_CACHE": "1"}
        if name == "after, both cores":
            env["VLLM_CPU_OMP_THREADS_BIND"] = BOTH_CORES
        if name == "after, no health checks":  # the gateway's checks of its engine (/health, /metrics) an hour apart
            env["ROPESERVE_HEALTH_INTERVAL_S"] = "3600"
        engine_port = free_port()
        engine_url = f"http://127.0.0.1:{engine_port}"
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine-port",
                   str(engine_port)]
        health = "/readyz"
    elif name == "stock vLLM":
        # its best flags here: the worker's cores as the default set-up binds them (every core of a small
        # machine), which stock vLLM's own default does not
        env |= {"VLLM_PLUGINS": "none", "VLLM_CPU_KVCACHE_SPACE": "4"} | worker_binding(env, allowed_cpus())[0]
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                   "--max-model-len", str(L * FACTOR), "--hf-overrides", json.dumps(yarn_overrides())]
        health = "/health"
    elif name == "llama.cpp":
        command = [str(LLAMA_VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(gguf_path()),
                   "--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                   "--n_ctx", str(L * FACTOR), "--n_threads", str(os.cpu_count()),
                   "--n_threads_batch", str(os.cpu_count()), "--rope_scaling_type", "2",  # LLAMA_ROPE_SCALING_TYPE_YARN
                   "--rope_freq_scale", str(1 / FACTOR), "--yarn_orig_ctx", str(L),
                   # its faster settings for this workload: no logits kept for every prompt token (the
                   # server's default, for logprobs nobody asks for here), flash attention, 2k batches;
                   # requests queue instead of a new one cancelling the one running (its default)
                   "--logits_all", "false", "--flash_attn", "true", "--n_batch", "2048",
                   "--interrupt_requests", "false"]
        health = "/v1/models"
    else:
        raise ValueError(name)
    # no restarts: an engine that dies fails the run
    process = EngineProcess(command, url=f"http://127.0.0.1:{port}", env=env, start_timeout_s=1200,
                            stop_timeout_s=60, max_restarts=0, health_path=health, log=log)
    return process, engine_url


async def _started(process: EngineProcess) -> float:
    """Start ``process``; the seconds until it answered its health check."""
    began = time.perf_counter()
    await process.start()
    return time.perf_counter() - began


async def _stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: the time of its first token, its end, its prompt and generated tokens."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    generated = usage["completion_tokens"] if usage else chunks
    return {"sent": sent, "first": first or end, "end": end, "generated": generated,
            "prompt_tokens": usage["prompt_tokens"] if usage else None}


async def _decode(client: httpx.AsyncClient, prompts: list[str], max_tokens: int) -> float:
    """Generated tokens per second of ``prompts`` running together (after each one's first token)."""
    rs = await asyncio.gather(*(_stream(client, p, max_tokens) for p in prompts))
    return sum(r["generated"] - 1 for r in rs) / (max(r["end"] for r in rs) - min(r["first"] for r in rs))


async def measure(url: str, prefill: dict[int, str], decode_prompts: list[str], decode_tokens: int, *,
                  passkey: tuple[int, ...] = (), engine_url: str | None = None) -> dict:
    """The measures through ``url``; with ``engine_url`` (a gateway's own engine) decode there too."""
    out: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        await _stream(client, decode_prompts[-1], 4)  # first-request costs out of the measures
        for n, prompt in prefill.items():
            r = await _stream(client, prompt, 1)
            ttft = r["first"] - r["sent"]
            out[f"ttft_{n // 1024}k_s"] = ttft
            out[f"prefill_{n // 1024}k_tok_s"] = (r["prompt_tokens"] or n) / ttft
        for running in (1, 16):
            out[f"decode_{running}_running_tok_s"] = await _decode(client, decode_prompts[:running], decode_tokens)
        for n in passkey:  # the README's self-check, as a user runs it
            sent = time.perf_counter()
            response = await client.get("/healthz/passkey", params={"len": n})
            if response.status_code not in (200, 503):
                raise RuntimeError(f"passkey?len={n}: {response.status_code} {response.text[:300]}")
            out[f"passkey_{n // 1024}k_s"] = time.perf_counter() - sent
    if engine_url:  # the gateway's share of decode: the same batches straight to its engine
        async with httpx.AsyncClient(base_url=engine_url, timeout=3600) as client:
            for running in (1, 16):
                out[f"decode_{running}_engine_only_tok_s"] = await _decode(client, decode_prompts[:running],
                                                                           decode_tokens)
    return out


async def run_engine(name: str, workload, passkey: tuple[int, ...], *, cold: bool = True, **kwargs) -> dict:
    """Start ``name``, measure it, stop it; ``after`` is started twice (cold, then warm and measured), and so is
    ``after, both cores`` (with ``cold`` false, once: its cache is warm already)."""
    result: dict[str, float] = {}
    with MemoryPeak() as memory:
        if name.startswith("after") and cold:
            cold, _ = engine(name, **kwargs)
            try:
                result["start_up_cold_s"] = await _started(cold)
            finally:
                await cold.stop()
        process, engine_url = engine(name, **kwargs)
        try:
            result["start_up_s"] = await _started(process)
            result |= await measure(process.url, *workload, passkey=passkey if name in GATEWAYS else (),
                                    engine_url=engine_url)
        finally:
            await process.stop()
    result["peak_gib"] = memory.peak / 2**30
    return result


def prompts(model_dir: Path, prefill_lengths: tuple[int, ...]) -> tuple[dict[int, str], list[str]]:
    """Book text cut to exact token counts of the default model's tokenizer (the same text for every
    engine; llama.cpp tokenizes it with the GGUF's copy of the same tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = (REPO.parent / "shared" / "data" / "books" / "katrine.txt").read_text(encoding="utf-8")
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    prefill = {n: tokenizer.decode(tokens[1000:1000 + n]) for n in prefill_lengths}
    decode = [tokenizer.decode(tokens[200 * i:200 * i + 64]) for i in range(16)]
    return prefill, decode


def table(rows: dict[str, dict[str, float]]) -> str:
    names = list(rows)
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    ratios = [("after/before", "after", "before"), ("both/after", "after, both cores", "after"),
              ("after/stock", "after", "stock vLLM"), ("quiet/after", "after, no health checks", "after"),
              ("quiet/stock", "after, no health checks", "stock vLLM"),
              ("llama.cpp/after", "llama.cpp", "after")]
    ratios = [r for r in ratios if r[1] in rows and r[2] in rows]
    lines = [f"{'':24}" + "".join(f"{n:>14}" for n in names) + "".join(f"{r[0]:>17}" for r in ratios)]
    for key in keys:
        cells = "".join(f"{rows[n][key]:>14.2f}" if key in rows[n] else f"{'-':>14}" for n in names)
        for _, a, b in ratios:
            have = key in rows[a] and key in rows[b] and rows[b][key]
            cells += f"{rows[a][key] / rows[b][key]:>17.3f}" if have else f"{'-':>17}"
        lines.append(f"{key:24}{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prefill at 2k and 8k, 32 new tokens")
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--logs", type=Path, help="where the servers' logs go (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=1, help="run the engines this many times in turn")
    parser.add_argument("--decode-only", action="store_true", help="decode alone: no prefill, no passkey")
    args = parser.parse_args()
    prefill_lengths = (2048, 8192) if args.quick else (2048, 16384)
    decode_tokens = 32 if args.quick else 128

    if "llama.cpp" in args.engines:
        subprocess.run([str(REPO / "scripts" / "setup_llamacpp.sh")], check=True)
    model_dir = prepare()
    dtype, why = choose_cpu_dtype(read_cpu_flags())
    print(f"dtype for after and stock vLLM: {dtype} ({why})", flush=True)
    prefill, decode = prompts(model_dir, prefill_lengths)
    workload = ({} if args.decode_only else prefill, decode, decode_tokens)
    passkey = () if args.decode_only else (4096, prefill_lengths[-1])
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="ropeserve-cpu-speed-") as tmp:
        log_dir = args.logs or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(args.rounds):
            rows = {}
            for k, name in enumerate(args.engines):
                print(f"round {i + 1}: running {name} ...", flush=True)
                # a vLLM cache per engine: only `after`'s second start (or later round) finds a compiled model
                cache = Path(tmp) / f"cache-{k}"
                with open(log_dir / f"{name.replace(' ', '_').replace(',', '')}.log", "ab") as log:
                    rows[name] = asyncio.run(run_engine(name, workload, passkey, cold=i == 0, log=log,
                                                        model_dir=model_dir, dtype=dtype, cache=cache))
                print(json.dumps(rows[name]), flush=True)
            rounds.append(rows)
            if args.rounds > 1:
                print(f"\nround {i + 1}\n{table(rows)}\n", flush=True)
    print()
    if args.rounds > 1:
        print(f"medians of {args.rounds} rounds")
    print(table(medians(rounds)))


def medians(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each engine's median of each measure over the rounds (the measures a round has)."""
    return {name: {key: statistics.median(r[name][key] for r in rounds if key in r[name])
                   for key in dict.fromkeys(k for r in rounds for k in r[name])}
            for name in rounds[0]}


if __name__ == "__main__":
    main()
