"""Throughput of LAM against all-MiniLM-L6-v2 (forward, op alone, encode); see
`python scripts/benchmark.py --help`. The logic lives in evaluation/benchmark.py."""

from lam_embed.evaluation.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
