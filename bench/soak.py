"""Soak test: steady load on the gateway for ``--minutes``; its memory (RSS) over time, errors, latency
percentiles. By default against the fake engine and a gateway process started here (bench/fake_stack.py), so
the figures are the gateway's own; or against a running gateway (``--gateway-url``, with ``--gateway-pid``
to follow its memory)::

    python bench/soak.py                           # 10 minutes, fake engine; JSON in bench/out/soak.json
    python bench/soak.py --quick                   # 1 minute
    python bench/soak.py --gateway-url http://127.0.0.1:8000 --gateway-pid 1234 --model SmolLM2-135M-Instruct

Load: ``--rps`` requests per second at a steady pace (open loop: a slow answer does not slow the sender; at most
``--max-in-flight`` at once), alternating non-streaming and streaming completions of short prompts, each
with its own text. Memory growth is measured from the end of a warm-up (``--warmup-s``: allocator pools and
caches fill first) to the end: the median RSS of the last minute against the median of the first minute
after the warm-up, so one sample's noise does not decide it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fake_stack import MODEL, fake_stack  # noqa: E402

SAMPLE_EVERY_S = 5.0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": round(1e3 * ordered[-1], 2),
            "count": len(ordered)}


class Soak:
    def __init__(self, url: str, model: str, args: argparse.Namespace) -> None:
        self.url = url
        self.model = model
        self.args = args
        self.latency: dict[str, list[float]] = {"completion": [], "stream": [], "stream_ttfb": []}
        self.errors: list[str] = []
        self.sent = 0
        self.in_flight = 0

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"model": self.model, "prompt": f"request {i}: " + " ".join(["word"] * (16 + i % 200)),
                "max_tokens": self.args.max_tokens, "temperature": 0}
        started = time.perf_counter()
        try:
            if i % 2 == 0:
                response = await client.post("/v1/completions", json=body)
                if response.status_code != 200 or not response.json()["choices"][0]["text"]:
                    raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
                self.latency["completion"].append(time.perf_counter() - started)
                return
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                text = b""
                async for chunk in response.aiter_bytes():
                    if not text:
                        self.latency["stream_ttfb"].append(time.perf_counter() - started)
                    text += chunk
                if response.status_code != 200 or not text.rstrip().endswith(b"data: [DONE]") or b'"error"' in text:
                    raise RuntimeError(f"{response.status_code}: {text[-200:]!r}")
            self.latency["stream"].append(time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001  (every failure is counted and reported)
            self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            self.in_flight -= 1

    async def run(self, pid: int | None) -> dict[str, Any]:
        args = self.args
        duration = args.minutes * 60
        process = psutil.Process(pid) if pid else None
        samples: list[tuple[float, int]] = []
        tasks: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=args.max_in_flight)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            started = time.monotonic()
            next_sample = started
            skipped = ticks = 0
            while (now := time.monotonic()) - started < duration:
                if process is not None and now >= next_sample:
                    samples.append((round(now - started, 1), process.memory_info().rss))
                    next_sample += SAMPLE_EVERY_S
                if self.in_flight < args.max_in_flight:
                    self.in_flight += 1
                    task = asyncio.create_task(self.one(client, self.sent))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    self.sent += 1
                else:
                    skipped += 1  # the gateway is behind: counted, not queued (the pace stays steady)
                ticks += 1
                await asyncio.sleep(max(0.0, started + ticks / args.rps - time.monotonic()))
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
            if process is not None:
                samples.append((round(time.monotonic() - started, 1), process.memory_info().rss))
        return self.report(samples, elapsed, skipped)

    def report(self, samples: list[tuple[float, int]], elapsed: float, skipped: int) -> dict[str, Any]:
        args = self.args
        result: dict[str, Any] = {
            "minutes": args.minutes, "rps_target": args.rps, "requests": self.sent, "elapsed_s": round(elapsed, 1),
            "achieved_rps": round(self.sent / elapsed, 2), "skipped_at_max_in_flight": skipped,
            "errors": len(self.errors), "first_errors": self.errors[:5],
            "latency": {name: percentiles(values) for name, values in self.latency.items()},
        }
        after = [(t, rss) for t, rss in samples if t >= args.warmup_s]
        if len(after) >= 2:
            window = max(60.0, SAMPLE_EVERY_S)
            first = [rss for t, rss in after if t < after[0][0] + window]
            last = [rss for t, rss in after if t > after[-1][0] - window]
            base, end = statistics.median(first), statistics.median(last)
            result["memory"] = {
                "rss_at_start_mib": round(samples[0][1] / 2**20, 1),
                "rss_after_warmup_mib": round(base / 2**20, 1), "rss_at_end_mib": round(end / 2**20, 1),
                "rss_max_mib": round(max(rss for _, rss in samples) / 2**20, 1),
                "growth_after_warmup_pct": round(100 * (end - base) / base, 2),
                "samples": [(t, round(rss / 2**20, 2)) for t, rss in samples],
            }
        return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.gateway_url:
        return await Soak(args.gateway_url.rstrip("/"), args.model, args).run(args.gateway_pid)
    async with fake_stack(token_delay_s=args.token_delay_s) as stack:
        return await Soak(stack.gateway_url, MODEL, args).run(stack.gateway_pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="1 minute, 30 s warm-up")
    parser.add_argument("--rps", type=float, default=20.0, help="requests per second (default: %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--token-delay-s", type=float, default=0.005, help="fake engine: seconds per token")
    parser.add_argument("--gateway-url", help="a running gateway (default: start the fake stack)")
    parser.add_argument("--gateway-pid", type=int, help="its process id, to follow its memory")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "soak.json")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.warmup_s = 1.0, 30.0
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), **result}, indent=2))
    summary = {k: v for k, v in result.items() if k != "memory"}
    if "memory" in result:
        summary["memory"] = {k: v for k, v in result["memory"].items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
