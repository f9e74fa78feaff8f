"""Experiment 3, short-context fidelity: perplexity at 1k..8k for static YaRN (factors 2, 4, 8) against
the plugin, which must equal the unscaled model there (checked bit for bit per window)::

    python bench/short_context.py --quick     # one book, 8k tokens per length
    python bench/short_context.py --full      # both books, 32k tokens per length, + dynamic NTK
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.evals.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(experiments=("short-context",)))
