"""Assemble a LAM release as a complete sentence-transformers folder (``lam-assemble --help``)."""

from lam_embed.release import main

if __name__ == "__main__":
    main()
