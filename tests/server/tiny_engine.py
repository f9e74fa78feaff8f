"""A stand-in engine *process* for the process tests (stdlib only, starts in milliseconds).

Answers ``GET /health`` (200, or 503 with ``--never-ready``), ``GET /v1/models`` and ``GET /metrics`` (the
rope plugin's evidence counters, at zero, as a fresh engine exports them); with ``--child-pid-file``
it first spawns a ``sleep`` child in its own process group (as vLLM spawns its engine core) and writes the
child's pid there; with ``--exit-after S`` it dies with code 3 after S seconds (a crash)::

    python tests/server/tiny_engine.py --port 8123 --model fake-model --max-model-len 65536
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--max-model-len", type=int, default=65536)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--child-pid-file")
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--starts-file", help="append one line per start (to count restarts)")
    args = parser.parse_args()
    if args.starts_file:
        with open(args.starts_file, "a") as f:
            f.write(f"{os.getpid()}\n")
    if args.child_pid_file:
        child = subprocess.Popen(["sleep", "600"])
        with open(args.child_pid_file, "w") as f:
            f.write(str(child.pid))
    if args.exit_after is not None:
        threading.Timer(args.exit_after, lambda: os._exit(3)).start()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._send(503 if args.never_ready else 200, b"")
            elif self.path == "/v1/models":
                body = {"object": "list", "data": [{"id": args.model, "max_model_len": args.max_model_len}]}
                self._send(200, json.dumps(body).encode())
            elif self.path == "/metrics":
                self._send(200, b"".join(f'{name}_total{{factor="1"}} 0\n'.encode() for name in (
                    "ropeserve_engine_rope_scheduled_tokens", "ropeserve_engine_rope_tokens")))
            else:
                self._send(404, b"{}")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    time.sleep(0.05)
    server.serve_forever()


if __name__ == "__main__":
    main()
