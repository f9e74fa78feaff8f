"""Benchmark: what the gateway adds to a request, compared with calling the engine directly.

Starts an engine (by default the fake engine of the gateway tests, which has no model, so the numbers are
the gateway's own cost; or a running engine given with ``--engine-url``) and a gateway process
(``python -m server.cli serve --engine-urls ...``) in front of it, which counts prompt tokens with the
engine's ``/tokenize``; with ``--tokenizer`` a second gateway that counts them with its own tokenizer (as
the embedded mode does). The same requests go to every target in interleaved rounds (each round probes
every target back to back, in a rotating order), so the added latency is the median of paired differences
and a busy machine's drift cancels out: sequential non-streaming requests (latency), sequential streams
(time to first byte), and concurrent non-streaming requests in alternating rounds (throughput). Printed
as a table; JSON in ``bench/out/gateway_overhead.json``::

    python bench/gateway_overhead.py --tokenizer ~/.cache/ropeserve/models/SmolLM2-135M-Instruct  # fake engine
    python bench/gateway_overhead.py --engine-url http://127.0.0.1:8100 --model SmolLM2-135M-Instruct \
        --tokenizer ~/.cache/ropeserve/models/SmolLM2-135M-Instruct
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
from collections.abc import Awaitable, Callable
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


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()
    return time.perf_counter() - started


async def _first_byte(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        ttfb = None
        async for _chunk in response.aiter_bytes():
            if ttfb is None:
                ttfb = time.perf_counter() - started
    return ttfb


def _rotated(targets: dict[str, str], i: int) -> list[tuple[str, str]]:
    """The targets in an order that rotates each round, so no target always goes first."""
    items = list(targets.items())
    return items[i % len(items):] + items[:i % len(items)]


async def paired(probe: Callable[[str], Awaitable[float]], targets: dict[str, str], n: int) -> dict[str, list[float]]:
    """``n`` rounds, each probing every target once back to back: the i-th samples of two targets were
    taken within a second of each other, so their difference is free of the machine's drift."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(n):
        for name, url in _rotated(targets, i):
            samples[name].append(await probe(url))
    return samples


async def concurrent(client: httpx.AsyncClient, url: str, body: dict[str, Any], n: int, width: int) -> float:
    """Seconds to serve ``n`` requests with ``width`` in flight."""
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(width)))
    return time.perf_counter() - started


async def measure(targets: dict[str, str], body: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await paired(lambda url: _post(client, url, body), targets, 3)  # warm-up: connections, caches
        latency = await paired(lambda url: _post(client, url, body), targets, args.requests)
        ttfb = await paired(lambda url: _first_byte(client, url, body), targets, args.requests)
        busy = {name: 0.0 for name in targets}
        rounds = max(1, args.requests // (4 * args.concurrency))
        for i in range(rounds):  # throughput in alternating rounds, for the same reason
            for name, url in _rotated(targets, i):
                busy[name] += await concurrent(client, url, body, 4 * args.concurrency, args.concurrency)
    base = latency["engine"]
    return [{"target": name, "p50_ms": 1e3 * statistics.median(latency[name]),
             "p95_ms": 1e3 * percentile(latency[name], 0.95), "ttfb_p50_ms": 1e3 * statistics.median(ttfb[name]),
             "requests_per_s": rounds * 4 * args.concurrency / busy[name],
             "added_p50_ms": 1e3 * statistics.median(b - a for a, b in zip(base, latency[name])),
             "added_ttfb_p50_ms": 1e3 * statistics.median(b - a for a, b in zip(ttfb["engine"], ttfb[name]))}
            for name in targets]


def _gateway(args: argparse.Namespace, engine_url: str, env: dict[str, str], tokenizer: str | None) -> EngineProcess:
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine-urls", engine_url,
               "--served-model-name", args.model, "--log-level", "warning",
               "--rope-original-max-position", str(args.original_max_position),
               "--rope-max-factor", str(args.max_factor)]
    if tokenizer:
        command += ["--tokenizer", tokenizer]
    return EngineProcess(command, url=f"http://127.0.0.1:{port}", env=env, start_timeout_s=120,
                         poll_interval_s=0.1, health_path="/readyz")


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    engine = None
    engine_url = args.engine_url
    if engine_url is None:
        port = free_port()
        engine_url = f"http://127.0.0.1:{port}"
        engine = EngineProcess([sys.executable, "-c", FAKE_ENGINE, args.model, str(port)], url=engine_url,
                               env=env, start_timeout_s=60, poll_interval_s=0.1)
    gateways = {"gateway (engine /tokenize)": _gateway(args, engine_url, env, None)}
    if args.tokenizer:
        gateways["gateway (own tokenizer)"] = _gateway(args, engine_url, env, args.tokenizer)
    try:
        if engine is not None:
            await engine.start()
        for gateway in gateways.values():
            await gateway.start()
        body = {"model": args.model, "prompt": " ".join(["hello"] * args.prompt_words),
                "max_tokens": args.max_tokens, "temperature": 0}
        return await measure({"engine": engine_url, **{name: g.url for name, g in gateways.items()}}, body, args)
    finally:
        for gateway in gateways.values():
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
    parser.add_argument("--tokenizer", help="also measure a gateway that counts tokens with this tokenizer "
                        "(a model directory), as the embedded mode does")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gateway_overhead.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    engine = results[0]
    print(f"{'target':<28} {'p50 ms':>8} {'p95 ms':>8} {'TTFB p50 ms':>12} {'req/s':>8} {'added p50 ms':>13} "
          f"{'added TTFB ms':>14} {'throughput':>10}")
    for row in results:
        print(f"{row['target']:<28} {row['p50_ms']:8.2f} {row['p95_ms']:8.2f} {row['ttfb_p50_ms']:12.2f} "
              f"{row['requests_per_s']:8.1f} {row['added_p50_ms']:+13.2f} {row['added_ttfb_p50_ms']:+14.2f} "
              f"{'x%.3f' % (row['requests_per_s'] / engine['requests_per_s']):>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
