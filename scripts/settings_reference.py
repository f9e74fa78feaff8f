#!/usr/bin/env python3
"""Print the gateway's settings reference as a markdown table (one row per GatewaySettings field).

docs/gateway.md and README.md include this output verbatim; tests/server/test_settings.py fails when one is stale::

    .venv/bin/python scripts/settings_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from server.settings import settings_markdown  # noqa: E402

if __name__ == "__main__":
    sys.stdout.write(settings_markdown())
