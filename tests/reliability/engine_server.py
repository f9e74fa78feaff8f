"""The fake vLLM engine of the gateway tests (tests/server/fake_engine.py) as a real process, for the fault
tests that kill or stop it and for the load benchmarks (bench/load_mixed.py, bench/soak.py)::

    PYTHONPATH=. python tests/reliability/engine_server.py --port 8123 [--token-delay-s 0.05] [--sign-answers]
        [--model fake-model] [--starts-file FILE]

``--starts-file`` appends ``PID UNIX_TIME`` at every start, so a test can count restarts and time them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable by path from a checkout

import uvicorn  # noqa: E402

from tests.server.fake_engine import MODEL, FakeEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--sign-answers", action="store_true")
    parser.add_argument("--starts-file")
    args = parser.parse_args()
    if args.starts_file:
        with open(args.starts_file, "a") as f:
            f.write(f"{os.getpid()} {time.time()}\n")
    engine = FakeEngine(model=args.model, token_delay_s=args.token_delay_s, sign_answers=args.sign_answers)
    uvicorn.run(engine.app, host="127.0.0.1", port=args.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
