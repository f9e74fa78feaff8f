"""Experiment 1, passkey retrieval: accuracy per method and context length, the paper's prompt and a
real-prose haystack; a length x depth heatmap per method (see :mod:`bench.evals.experiments`)::

    python bench/passkey_retrieval.py --quick     # 4k/8k/16k, 2 depths, 1 seed, 3 methods
    python bench/passkey_retrieval.py --full      # 4k..64k, depths 0.1..0.9, 4 seeds, 7 methods
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.evals.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(experiments=("passkey",)))
