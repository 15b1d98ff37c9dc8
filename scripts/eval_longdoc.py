"""Long-document retrieval (QMSum, SQuALITY, passkey, needle) for several models and methods; see --help."""

from lam_embed.evaluation.longdoc import main

if __name__ == "__main__":
    raise SystemExit(main())
