"""Distil LAM from all-MiniLM-L6-v2; see training/distill.py and `--help`."""

from lam_embed.training.distill import main

if __name__ == "__main__":
    main()
