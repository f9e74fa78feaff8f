"""``ropeserve-client``: complete, chat, list models, probe health, and sweep passkey retrieval.

    ropeserve-client complete "The capital of France is" --max-tokens 8
    ropeserve-client chat "Tell me a joke" --stream
    ropeserve-client passkey --lengths 1k,4k,8k --depths 0.1,0.5,0.9 --seeds 0,1 --csv passkey.csv
    ropeserve-client health

The gateway is ``--url`` (or $ROPESERVE_URL, default http://127.0.0.1:8000) and the key ``--api-key``
(or $ROPESERVE_API_KEY). Exit status: 0 on success, 1 when the gateway answered with an error (its
message is printed as it came), 2 on bad usage; ``passkey --strict`` also exits 1 on any miss, and
``health`` exits 1 when the gateway is not ready. The progress bar and tables use rich when it is
installed (the ``cli`` extra) and plain text otherwise. While a long passkey check runs, the progress shows
how far the engine's prefill is, the elapsed time and the time left at the measured rate (from the
gateway's ``/healthz/passkey/progress``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import httpx

from ._version import __version__
from .client import DEFAULT_URL, Client
from .errors import RopeserveError
from .retry import RetryPolicy


def _load_rich() -> Any:
    """The rich package, or None when it is not installed (the CLI then prints plain text)."""
    try:
        import rich  # noqa: F401
        import rich.console
        import rich.progress
        import rich.table
    except ImportError:
        return None
    return rich


# -- the passkey sweep (pure parts first) -----------------------------------------------------------
@dataclass
class SweepRow:
    """One point of a passkey sweep and its outcome (``error`` set when the request itself failed)."""

    length: int
    depth: float
    seed: int
    passed: bool = False
    prompt_tokens: int | None = None
    expected_key: int | None = None
    answer: str | None = None
    rope_factor: float | None = None
    latency_s: float | None = None
    cached: bool | None = None
    error: str | None = None


COLUMNS = [
    "length", "depth", "seed", "passed", "prompt_tokens", "expected_key", "answer", "rope_factor",
    "latency_s", "cached", "error",
]


# Short headers for the terminal tables (the CSV keeps the full names above).
HEADERS = {"length": "len", "passed": "ok", "prompt_tokens": "tokens", "expected_key": "key",
           "rope_factor": "factor", "latency_s": "secs"}


def _table_columns(rows: Sequence[SweepRow]) -> list[str]:
    """COLUMNS, less ``error`` when no point failed to run."""
    return [c for c in COLUMNS if c != "error" or any(r.error for r in rows)]


def sweep_points(lengths: Sequence[int], depths: Sequence[float], seeds: Sequence[int]) -> list[tuple[int, float, int]]:
    """Every (length, depth, seed), lengths outermost: short, cheap prompts come first."""
    return list(itertools.product(lengths, depths, seeds))


def describe_progress(progress: dict[str, Any]) -> str:
    """'12,288/65,526 tokens (19%), 95 s, about 410 s left' from /healthz/passkey/progress."""
    done, total = progress.get("computed_tokens", 0), progress.get("prompt_tokens") or 0
    text = f"{done:,}/{total:,} tokens" + (f" ({done / total:.0%})" if total else "")
    text += f", {progress.get('elapsed_s', 0):.0f} s"
    if progress.get("eta_s") is not None:
        text += f", about {progress['eta_s']:.0f} s left"
    return text


def run_point(client: Client, length: int, depth: float, seed: int,
              on_progress: Callable[[str], None] | None = None, every_s: float = 2.0) -> SweepRow:
    """One passkey check; a failed request is recorded in the row rather than ending the sweep. While it
    runs, ``on_progress`` gets the gateway's progress every ``every_s`` seconds (elapsed time and time
    left at the measured prefill rate)."""
    row = SweepRow(length, depth, seed)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every_s):
            try:
                progress = client.passkey_progress()
            except RopeserveError:
                continue
            if progress.get("running") and progress.get("len") == length:
                on_progress(describe_progress(progress))

    watcher = threading.Thread(target=watch, daemon=True) if on_progress is not None else None
    if watcher is not None:
        watcher.start()
    try:
        r = client.passkey(length, depth=depth, seed=seed)
    except RopeserveError as err:
        row.error = f"{type(err).__name__}: {err.message}"
        return row
    finally:
        done.set()
    row.passed, row.prompt_tokens, row.expected_key = r.passed, r.prompt_tokens, r.expected_key
    row.answer, row.rope_factor, row.latency_s, row.cached = r.answer, r.rope_factor, r.latency_s, r.cached
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("\n", " ")


def format_table(rows: Sequence[SweepRow]) -> str:
    """The results as an aligned plain-text table."""
    columns = _table_columns(rows)
    cells = [[HEADERS.get(c, c) for c in columns]] + [[_cell(getattr(r, c)).strip() for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(rows: Sequence[SweepRow]) -> str:
    """'passed P/N' overall and per length."""
    parts = []
    for length in dict.fromkeys(r.length for r in rows):
        group = [r for r in rows if r.length == length]
        parts.append(f"{length}: {sum(r.passed for r in group)}/{len(group)}")
    total = sum(r.passed for r in rows)
    return f"passed {total}/{len(rows)} ({', '.join(parts)})"


def write_csv(rows: Sequence[SweepRow], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def _sweep(client: Client, args: argparse.Namespace) -> int:
    points = sweep_points(args.lengths, args.depths, args.seeds)
    rich = None if args.no_progress else _load_rich()
    rows: list[SweepRow] = []
    if rich is not None:
        console = rich.console.Console(file=sys.stderr)
        columns = (
            rich.progress.TextColumn("{task.description}"),
            rich.progress.BarColumn(),
            rich.progress.MofNCompleteColumn(),
            rich.progress.TimeElapsedColumn(),
        )
        with rich.progress.Progress(*columns, console=console) as progress:
            task = progress.add_task("passkey", total=len(points))
            for length, depth, seed in points:
                label = f"passkey len={length} depth={depth:g} seed={seed}"
                progress.update(task, description=label)
                rows.append(run_point(client, length, depth, seed, on_progress=lambda text, label=label:
                                      progress.update(task, description=f"{label}: {text}")))
                progress.advance(task)
    else:
        for i, (length, depth, seed) in enumerate(points, 1):
            def show(text: str, i=i, length=length) -> None:
                print(f"[{i}/{len(points)}] len={length}: {text}", file=sys.stderr)

            row = run_point(client, length, depth, seed, on_progress=None if args.no_progress else show,
                            every_s=30.0)
            rows.append(row)
            verdict = "passed" if row.passed else ("error" if row.error else "missed")
            if not args.no_progress:
                print(f"[{i}/{len(points)}] len={length} depth={depth:g} seed={seed}: {verdict}", file=sys.stderr)

    rich = _load_rich()  # the table uses rich whenever it is installed, progress or not
    if rich is not None:
        columns = _table_columns(rows)
        table = rich.table.Table(title="passkey retrieval")
        for c in columns:
            table.add_column(HEADERS.get(c, c), justify="left" if c in ("answer", "error") else "right",
                             overflow="fold")
        for r in rows:
            style = "green" if r.passed else "red"
            table.add_row(*[_cell(getattr(r, c)).strip() for c in columns], style=style)
        rich.console.Console(file=sys.stdout).print(table)
    else:
        print(format_table(rows))
    print(summarize(rows))
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            write_csv(rows, f)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.strict and not all(r.passed for r in rows):
        return 1
    return 0


# -- the other commands -------------------------------------------------------------------------------
def _print_rope_factor(value: float | None) -> None:
    print(f"x-rope-factor: {_cell(value) or '(none)'}", file=sys.stderr)


def _text(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def _complete(client: Client, args: argparse.Namespace) -> int:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, rope_factor=args.rope_factor)
    prompt = _text(args.prompt)
    if args.stream:
        with client.complete_stream(prompt, **kwargs) as stream:
            _print_rope_factor(stream.rope_factor)
            for chunk in stream:
                print(chunk.model_dump_json() if args.json else chunk.text, end="\n" if args.json else "", flush=True)
        if not args.json:
            print()
        return 0
    out = client.complete(prompt, **kwargs)
    _print_rope_factor(out.rope_factor)
    print(out.model_dump_json(indent=2) if args.json else out.text)
    return 0


def _chat(client: Client, args: argparse.Namespace) -> int:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, rope_factor=args.rope_factor)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": _text(args.message)})
    if args.stream:
        with client.chat_stream(messages, **kwargs) as stream:
            _print_rope_factor(stream.rope_factor)
            for chunk in stream:
                print(chunk.model_dump_json() if args.json else chunk.content, end="\n" if args.json else "", flush=True)
        if not args.json:
            print()
        return 0
    out = client.chat(messages, **kwargs)
    _print_rope_factor(out.rope_factor)
    print(out.model_dump_json(indent=2) if args.json else out.content)
    return 0


def _models(client: Client, args: argparse.Namespace) -> int:
    for m in client.models().data:
        print(m.id)
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    alive, ready = client.health(), client.ready()
    print(f"healthz: {alive.status_code} {_cell(alive.detail)}")
    print(f"readyz: {ready.status_code} {_cell(ready.detail)}")
    return 0 if alive.ok and ready.ok else 1


# -- argument parsing ---------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    """'1k,4096,8K' -> [1024, 4096, 8192]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        scale = 1024 if part[-1] in "kK" else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {part!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0: {part!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def _depths(text: str) -> list[float]:
    try:
        out = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise argparse.ArgumentTypeError(f"depths are fractions in [0, 1]: {text!r}")
    return out


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (server default)")
    p.add_argument("--rope-factor", type=float, default=None, help="ask for this RoPE scale factor")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--json", action="store_true", help="print the raw answer (or chunks) as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropeserve-client", description="Client of the ropeserve gateway.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--url", default=os.environ.get("ROPESERVE_URL", DEFAULT_URL),
                        help="gateway URL (default $ROPESERVE_URL or %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("ROPESERVE_API_KEY"),
                        help="API key (default $ROPESERVE_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the first in /v1/models)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--retries", type=int, default=3, help="retries on 429/503 and refused connections (default 3)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("complete", help="POST /v1/completions")
    p.add_argument("prompt", help="the prompt ('-' reads it from standard input)")
    _generation_args(p)
    p.set_defaults(run=_complete)

    p = sub.add_parser("chat", help="POST /v1/chat/completions")
    p.add_argument("message", help="the user message ('-' reads it from standard input)")
    p.add_argument("--system", default=None, help="a system message")
    _generation_args(p)
    p.set_defaults(run=_chat)

    p = sub.add_parser("models", help="GET /v1/models")
    p.set_defaults(run=_models)

    p = sub.add_parser("health", help="GET /healthz and /readyz (exit 1 unless both are 200)")
    p.set_defaults(run=_health)

    p = sub.add_parser("passkey", help="sweep passkey retrieval over lengths x depths x seeds")
    p.add_argument("--lengths", type=_ints, default=[1024, 4096], help="prompt lengths in tokens, e.g. 1k,4k,8k")
    p.add_argument("--depths", type=_depths, default=[0.1, 0.5, 0.9], help="key depths in [0, 1] (default 0.1,0.5,0.9)")
    p.add_argument("--seeds", type=_ints, default=[0], help="seeds; each gives another key and filler (default 0)")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the results as CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--strict", action="store_true", help="exit 1 unless every point passed")
    p.set_defaults(run=_sweep)
    return parser


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run the CLI; ``transport`` replaces the network (tests)."""
    args = build_parser().parse_args(argv)
    if args.retries < 0:
        print("error: --retries must be >= 0", file=sys.stderr)
        return 2
    retry = RetryPolicy(max_retries=args.retries)
    started = time.monotonic()
    try:
        with Client(args.url, api_key=args.api_key, model=args.model, timeout=args.timeout, retry=retry,
                    transport=transport) as client:
            return args.run(client, args)
    except RopeserveError as err:
        status = f" {err.status_code}" if err.status_code is not None else ""
        code = f" {err.code}" if err.code else ""
        print(f"error ({type(err).__name__}{status}{code}): {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - started:.1f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
