"""Give a release a second set of layers for long inputs, taken from another release.

The result reads inputs of more than --min-tokens valid tokens (special tokens included)
with the layers of --long-input-release and the others with those of RELEASE
(LAMConfig.long_input_min_tokens), so that short texts keep RELEASE's embeddings exactly
while documents get the layers of a long-document stage run. Both releases must come from
one architecture and share their embeddings. The result is a release folder with both
runs' manifests, which ``scripts/assemble_lam.py --release`` turns into a
sentence-transformers folder.
"""

import argparse

from lam_embed.cli import DefaultsHelpFormatter, non_negative_int
from lam_embed.release import add_long_input_layers, release_command


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("release", help="release folder whose layers read inputs of up to --min-tokens tokens")
    p.add_argument("--long-input-release", required=True,
                   help="release folder (a long-document stage run) whose layers read longer inputs")
    p.add_argument("--min-tokens", type=non_negative_int, default=256,
                   help="inputs of more valid tokens than this are read by the long-input layers")
    p.add_argument("--output", required=True, help="release folder to write")
    p.add_argument("--teacher", default=None, help="teacher folder or hub name (default: all-MiniLM-L6-v2)")
    release_command(p, argv, "add_long_input_layers.py", lambda args, manifest: add_long_input_layers(
        args.release, args.long_input_release, args.min_tokens, args.output, manifest=manifest, teacher=args.teacher))


if __name__ == "__main__":
    main()
