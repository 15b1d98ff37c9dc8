"""Average the weights of several distillation runs into one release.

Each folder is the ``release`` folder that ``scripts/distill.py`` writes into its
--output-dir. The result is a release folder of the same form (tensors that differ
from the teacher, fp16, and a manifest that holds the manifests of the runs), which
``scripts/assemble_lam.py --release`` turns into a sentence-transformers folder.
The shipped weights are the equal-weight average of two runs; the README gives the
commands.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from lam_embed.environment import git_commit
from lam_embed.release import MANIFEST_FILE, average_releases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("releases", nargs="+", help="release folders of two or more distillation runs of one architecture")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="weight of each release, non-negative, summing to 1 (default: equal weights)")
    p.add_argument("--output", required=True, help="release folder to write")
    p.add_argument("--teacher", default=None, help="teacher folder or hub name (default: all-MiniLM-L6-v2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sources = []
    for folder in args.releases:
        path = Path(folder) / MANIFEST_FILE
        sources.append(json.loads(path.read_text()) if path.is_file() else {})
    manifest = {
        "command": "python scripts/average_releases.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit() or "unknown",
        "device": ", ".join(sorted({s.get("device", "unknown") for s in sources})),
        # The runs are independent, so they can share one GPU; their sum bounds the time
        # taken one after the other.
        "train_minutes": round(sum(s.get("train_minutes", 0.0) for s in sources), 2),
        "runs": sources,
    }
    try:
        average_releases(args.releases, args.output, weights=args.weights, manifest=manifest, teacher=args.teacher)
    except (ValueError, FileNotFoundError) as error:
        p.error(str(error))
    print(f"wrote {args.output}; assemble it with `python scripts/assemble_lam.py --release {args.output}`")


if __name__ == "__main__":
    main()
