"""End-to-end encoding of real text (sentences, passages, articles), LAM beside all-MiniLM-L6-v2,
first call and warm; see `python scripts/benchmark_encode.py --help`. The logic lives in
evaluation/encode_pipeline.py."""

from lam_embed.evaluation.encode_pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
