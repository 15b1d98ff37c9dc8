"""Average the weights of several distillation runs into one release.

Each folder is the ``release`` folder that ``scripts/distill.py`` or
``scripts/train_longdoc.py`` writes into its --output-dir, or a release folder itself.
The result is a release folder of the same form (tensors that differ from the teacher,
fp16, and a manifest that holds the manifests of the runs), which
``scripts/assemble_lam.py --release`` turns into a sentence-transformers folder.
The base release is the equal-weight average of two distillation runs; the README
gives the commands of every step of the shipped weights.
"""

import argparse

from lam_embed.cli import DefaultsHelpFormatter
from lam_embed.release import average_releases, release_command


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("releases", nargs="+", help="release folders of two or more distillation runs of one architecture")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="weight of each release, non-negative, summing to 1 (default: equal weights)")
    p.add_argument("--output", required=True, help="release folder to write")
    p.add_argument("--teacher", default=None, help="teacher folder or hub name (default: all-MiniLM-L6-v2)")
    release_command(p, argv, "average_releases.py", lambda args, manifest: average_releases(
        args.releases, args.output, weights=args.weights, manifest=manifest, teacher=args.teacher))


if __name__ == "__main__":
    main()
