"""Fine-tune a sentence-transformers model (LAM or any other) on labelled pairs; see `python scripts/finetune.py --help`."""

from lam_embed.training.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
