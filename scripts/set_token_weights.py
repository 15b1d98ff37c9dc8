"""A copy of a LAM folder with corpus token weights in its long-input pooling (``--help``)."""

from lam_embed.token_weights import main

if __name__ == "__main__":
    main()
