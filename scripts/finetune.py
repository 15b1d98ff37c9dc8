"""Fine-tune a sentence-transformers model (LAM or any other) on labelled pairs; see `python scripts/finetune.py --help`."""

import os
import sys

# Run from a checkout without installing: the project root is the parent of scripts/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lam_embed.training.finetune import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
