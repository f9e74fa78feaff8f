"""Benchmark: what the gateway adds to a request, compared with calling the engine directly.

Starts an engine (by default the fake engine of the gateway tests, which has no model, so the numbers are
the gateway's own cost; or a running engine given with ``--engine-url``) and a gateway process
(``python -m server.cli serve --engine-urls ...``) in front of it, then sends the same requests to both:
sequential non-streaming requests (latency), sequential streams (time to first byte) and concurrent
non-streaming requests (throughput). The gateway's extra work per request is one ``/tokenize`` call, the
admission, and relaying the answer. Printed as a table; JSON in ``bench/out/gateway_overhead.json``::

    python bench/gateway_overhead.py                                   # fake engine, about 30 s
    python bench/gateway_overhead.py --engine-url http://127.0.0.1:8100 --model SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.engine_process import EngineProcess, free_port  # noqa: E402

FAKE_ENGINE = ("import sys, uvicorn; from tests.server.fake_engine import FakeEngine; "
               "uvicorn.run(FakeEngine(model=sys.argv[1]).app, host='127.0.0.1', port=int(sys.argv[2]), "
               "log_level='warning')")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def sequential(client: httpx.AsyncClient, url: str, body: dict[str, Any], n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        response = await client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)
    return latencies


async def first_bytes(client: httpx.AsyncClient, url: str, body: dict[str, Any], n: int) -> list[float]:
    ttfb = []
    for _ in range(n):
        started = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
            response.raise_for_status()
            first = True
            async for _chunk in response.aiter_bytes():
                if first:
                    ttfb.append(time.perf_counter() - started)
                    first = False
    return ttfb


async def concurrent(client: httpx.AsyncClient, url: str, body: dict[str, Any], n: int, width: int) -> float:
    """Requests per second with ``width`` requests in flight."""
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(width)))
    return n / (time.perf_counter() - started)


async def measure(name: str, url: str, body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await sequential(client, url, body, 3)  # warm-up: connections, caches
        latency = await sequential(client, url, body, args.requests)
        ttfb = await first_bytes(client, url, body, args.requests)
        rps = await concurrent(client, url, body, args.requests, args.concurrency)
    return {"target": name, "p50_ms": 1e3 * statistics.median(latency), "p95_ms": 1e3 * percentile(latency, 0.95),
            "ttfb_p50_ms": 1e3 * statistics.median(ttfb), "requests_per_s": rps}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    engine = None
    engine_url = args.engine_url
    if engine_url is None:
        port = free_port()
        engine_url = f"http://127.0.0.1:{port}"
        engine = EngineProcess([sys.executable, "-c", FAKE_ENGINE, args.model, str(port)], url=engine_url,
                               env=env, start_timeout_s=60, poll_interval_s=0.1)
    gateway_port = free_port()
    gateway = EngineProcess(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(gateway_port), "--engine-urls", engine_url,
         "--served-model-name", args.model, "--log-level", "warning",
         "--rope-original-max-position", str(args.original_max_position),
         "--rope-max-factor", str(args.max_factor)],
        url=f"http://127.0.0.1:{gateway_port}", env=env, start_timeout_s=120, poll_interval_s=0.1,
        health_path="/readyz")
    try:
        if engine is not None:
            await engine.start()
        await gateway.start()
        body = {"model": args.model, "prompt": " ".join(["hello"] * args.prompt_words),
                "max_tokens": args.max_tokens, "temperature": 0}
        return [await measure("engine", engine_url, body, args),
                await measure("gateway", gateway.url, body, args)]
    finally:
        await gateway.stop()
        if engine is not None:
            await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-url", help="a running engine (default: start the fake engine)")
    parser.add_argument("--model", default="fake-model", help="served model name (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--original-max-position", type=int, default=8192)
    parser.add_argument("--max-factor", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gateway_overhead.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    engine, gateway = results
    print(f"{'target':<8} {'p50 ms':>8} {'p95 ms':>8} {'TTFB p50 ms':>12} {'req/s':>8}")
    for row in results:
        print(f"{row['target']:<8} {row['p50_ms']:8.2f} {row['p95_ms']:8.2f} {row['ttfb_p50_ms']:12.2f} "
              f"{row['requests_per_s']:8.1f}")
    print(f"gateway overhead: p50 +{gateway['p50_ms'] - engine['p50_ms']:.2f} ms, "
          f"TTFB +{gateway['ttfb_p50_ms'] - engine['ttfb_p50_ms']:.2f} ms, throughput "
          f"x{gateway['requests_per_s'] / engine['requests_per_s']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
