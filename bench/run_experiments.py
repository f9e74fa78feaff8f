"""The evidence experiments (passkey retrieval, perplexity vs context, short-context fidelity), any subset,
sharing one engine start per configuration between them. See :mod:`bench.evals.cli` for the options::

    python bench/run_experiments.py --quick                 # all three, a few cells each
    python bench/run_experiments.py perplexity --full --dry-run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.evals.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
