"""Experiment 2, perplexity against context length on the two novels (the paper's truncated-document
protocol), scored from the engine's prompt logprobs; a Figure-1-style plot and a Table-2-style table::

    python bench/perplexity.py --quick     # 1k..16k, one book, 7 methods
    python bench/perplexity.py --full      # 1k..64k, both books
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.evals.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(experiments=("perplexity",)))
