"""Set how a LAM release pools long inputs (see ``--help``)."""

from lam_embed.release import pooling_main

if __name__ == "__main__":
    pooling_main()
