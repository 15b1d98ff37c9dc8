"""Spearman/Pearson of cosine similarity on STS-B; see `python scripts/eval_stsb.py --help`."""

from lam_embed.evaluation.stsb import main

if __name__ == "__main__":
    raise SystemExit(main())
