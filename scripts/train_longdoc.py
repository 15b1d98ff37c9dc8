"""Train LAM to embed long documents in one pass; see training/longdoc.py and `--help`."""

from lam_embed.training.longdoc import main

if __name__ == "__main__":
    main()
