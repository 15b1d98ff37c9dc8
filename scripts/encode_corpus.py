"""Embed a text file, one text a line, into resumable shards; see `python scripts/encode_corpus.py --help`."""

from lam_embed.corpus import main

if __name__ == "__main__":
    raise SystemExit(main())
