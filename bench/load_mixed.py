"""Load test: 64 concurrent requests of mixed lengths (short and 16k tokens) through the gateway, each output
compared with the same request run alone. Greedy decoding, so a request's output depends only on its own
prompt and its own RoPE factor: an output (or an ``x-rope-factor``) that changes under load means state
leaked between requests, e.g. one request's scale applied to another's tokens::

    python bench/load_mixed.py                     # fake engine (signs each answer with factor and prompt)
    python bench/load_mixed.py --quick             # 16 requests, long = 10k words
    python bench/load_mixed.py --gateway-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \\
        --long-words 12000 --logprobs --max-logprob-diff 1e-4   # a real gateway, engine in float32

By default the gateway and the fake vLLM engine are started here (bench/fake_stack.py); the fake engine's
answer carries the factor it ran the request at and a hash of the prompt it got, so the comparison checks the
gateway's part (routing, admission, the factor sent with each request) exactly. Against a real engine, outputs
must be identical when it runs in float32 (tokens exactly; logprobs within ``--max-logprob-diff``, 1e-4 as in
tests/plugin/test_engine_fidelity.py, since vLLM CPU is not bitwise invariant to batching even in float32);
in bf16, batching changes the arithmetic and a near-tie can flip a token, so ``--min-identical-fraction``
states the tolerance (the report gives the first differing token of each mismatch and, with ``--logprobs``,
the largest logprob difference over the tokens both runs share).
Prompts are windows of a novel from shared/data/books (each request its own window). JSON in
bench/out/load_mixed.json; exit status 1 on any error, factor change or more mismatches than tolerated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fake_stack import MODEL, fake_stack  # noqa: E402

BOOK = "katrine.txt"


def book_words() -> list[str]:
    shared = Path(os.environ.get("ROPESERVE_SHARED", REPO.parent / "shared"))
    path = shared / "data" / "books" / BOOK
    if path.exists():
        return path.read_text(encoding="utf-8").split()
    rng = random.Random(0)  # no book: seeded pseudo-words, enough for the fake engine
    return ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(100_000)]


def build_requests(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.requests`` requests, every ``1/long_fraction``-th one long, each on its own window of the book."""
    words = book_words()
    rng = random.Random(args.seed)
    every = max(1, round(1 / args.long_fraction)) if args.long_fraction > 0 else 0
    requests = []
    for i in range(args.requests):
        long = every and i % every == 0
        count = args.long_words if long else rng.randint(args.short_words // 4, args.short_words)
        start = rng.randrange(0, max(1, len(words) - count))
        text = " ".join((words * (1 + count // len(words)))[start:start + count])
        body: dict[str, Any] = {"model": args.model, "prompt": text, "max_tokens": args.max_tokens,
                                "temperature": 0, "seed": 0}
        if args.logprobs:
            body["logprobs"] = 1
        requests.append({"id": i, "kind": "long" if long else "short", "words": count, "body": body})
    return requests


async def send(client: httpx.AsyncClient, request: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = await client.post("/v1/completions", json=request["body"])
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return {"error": f"{response.status_code}: {response.text[:300]}", "seconds": seconds}
    choice = response.json()["choices"][0]
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    tokens = (choice.get("logprobs") or {}).get("tokens")
    return {"text": choice["text"], "factor": response.headers.get("x-rope-factor"), "seconds": seconds,
            "tokens": tokens, "logprobs": logprobs}


def compare(alone: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"identical": alone["text"] == loaded["text"], "factor_same": alone["factor"] == loaded["factor"]}
    if alone.get("tokens") and loaded.get("tokens"):
        shared = 0
        for a, b in zip(alone["tokens"], loaded["tokens"], strict=False):
            if a != b:
                break
            shared += 1
        row["first_diff_token"] = None if row["identical"] else shared
        if alone.get("logprobs") and loaded.get("logprobs") and shared:
            row["max_logprob_diff"] = max(abs(a - b) for a, b in zip(alone["logprobs"][:shared],
                                                                    loaded["logprobs"][:shared], strict=True)
                                          if a is not None and b is not None)
    elif not row["identical"]:
        row["first_diff_char"] = next((i for i, (a, b) in enumerate(zip(alone["text"], loaded["text"], strict=False))
                                       if a != b), min(len(alone["text"]), len(loaded["text"])))
    return row


def latency(results: list[dict[str, Any]], requests: list[dict[str, Any]], kind: str) -> dict[str, float]:
    values = sorted(r["seconds"] for r, q in zip(results, requests, strict=True) if q["kind"] == kind)
    if not values:
        return {}
    return {"p50_s": round(values[len(values) // 2], 3), "p90_s": round(values[int(0.9 * len(values))], 3),
            "max_s": round(values[-1], 3), "count": len(values)}


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    requests = build_requests(args)
    limits = httpx.Limits(max_connections=args.requests + 8, max_keepalive_connections=args.requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        alone = [await send(client, request) for request in requests]  # one at a time: the reference
        order = list(range(len(requests)))
        random.Random(args.seed + 1).shuffle(order)  # the concurrent run starts them in another order
        started = time.perf_counter()
        shuffled = await asyncio.gather(*(send(client, requests[i]) for i in order))
        wall = time.perf_counter() - started
    loaded: list[dict[str, Any]] = [{}] * len(requests)
    for i, result in zip(order, shuffled, strict=True):
        loaded[i] = result
    errors = [f"request {q['id']} ({phase}): {r['error']}" for phase, results in (("alone", alone), ("loaded", loaded))
              for q, r in zip(requests, results, strict=True) if "error" in r]
    rows = [{"id": q["id"], "kind": q["kind"], "words": q["words"], **compare(a, b)}
            for q, a, b in zip(requests, alone, loaded, strict=True) if "error" not in a and "error" not in b]
    identical = sum(row["identical"] for row in rows)
    diffs = [row["max_logprob_diff"] for row in rows if "max_logprob_diff" in row]
    return {
        "gateway": url, "requests": len(requests), "long": sum(q["kind"] == "long" for q in requests),
        "long_words": args.long_words, "max_tokens": args.max_tokens,
        "errors": len(errors), "first_errors": errors[:5],
        "identical": identical, "compared": len(rows),
        "identical_fraction": round(identical / len(rows), 4) if rows else 0.0,
        "factor_changed": sum(not row["factor_same"] for row in rows),
        "factors": sorted({r["factor"] for r in alone if "factor" in r}),
        "max_logprob_diff": max(diffs) if diffs else None,
        "mismatches": [row for row in rows if not row["identical"] or not row["factor_same"]][:10],
        "concurrent_wall_s": round(wall, 2),
        "latency_alone": {kind: latency(alone, requests, kind) for kind in ("short", "long")},
        "latency_concurrent": {kind: latency(loaded, requests, kind) for kind in ("short", "long")},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.gateway_url:
        return await run(args.gateway_url.rstrip("/"), args)
    async with fake_stack(token_delay_s=args.token_delay_s, sign_answers=True) as stack:
        return await run(stack.gateway_url, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--long-fraction", type=float, default=0.25, help="share of 16k requests (default: %(default)s)")
    parser.add_argument("--long-words", type=int, default=16000, help="words of a long prompt (fake engine: = tokens)")
    parser.add_argument("--short-words", type=int, default=400, help="most words of a short prompt")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--logprobs", action="store_true", help="also compare token logprobs (real engines)")
    parser.add_argument("--min-identical-fraction", type=float, default=1.0,
                        help="tolerated share of identical outputs (1.0: exact, float32 or fake engine)")
    parser.add_argument("--max-logprob-diff", type=float,
                        help="tolerated |logprob difference| over shared tokens (with --logprobs; float32: 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--quick", action="store_true", help="16 requests, long prompts of 10000 words")
    parser.add_argument("--token-delay-s", type=float, default=0.01, help="fake engine: seconds per token")
    parser.add_argument("--gateway-url", help="a running gateway (default: start the fake stack)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "load_mixed.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.long_words = 16, 10000
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), **result}, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "mismatches"}, indent=2))
    for row in result["mismatches"]:
        print("mismatch:", row)
    worst = result["max_logprob_diff"]
    failed = (result["errors"] or result["factor_changed"]
              or result["identical_fraction"] < args.min_identical_fraction
              or (args.max_logprob_diff is not None and worst is not None and worst > args.max_logprob_diff))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
