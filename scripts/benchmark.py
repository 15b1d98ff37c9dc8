"""Throughput of LAM against all-MiniLM-L6-v2 (forward, op alone, encode); see
`python scripts/benchmark.py --help`. The logic lives in evaluation/benchmark.py."""

import os
import sys

# Run from anywhere: the project root (parent of scripts/) holds lam_embed and evaluation.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lam_embed.evaluation.benchmark import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
