"""Stage the teacher and a data sample in a git-ignored folder for the GPU machine.

The GPU machine receives only the working tree (64 MiB a call) and not ../shared,
so this writes the teacher with fp16 weights (about 45 MB) and samples of the
corpus into --out, to be carried along with the call.
"""

import argparse
import gzip
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from lam_embed import resolve_teacher_path
from lam_embed.data import default_data_dir, read_text_lines


def write_lines(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    data = default_data_dir()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=".stage", help="folder to write (keep it git-ignored)")
    p.add_argument("--data-dir", default=str(data) if data else None, help="the shared data folder")
    p.add_argument("--sentences", type=int, default=250_000, help="sentences to copy (from the start of the shuffled file)")
    p.add_argument("--passages", type=int, default=9_000, help="training passages to copy (from the start of the file)")
    p.add_argument("--holdout", type=int, default=1_000, help="held-out passages kept at the end of the file, as in the original")
    args = p.parse_args(argv)
    out = Path(args.out)
    data_dir = Path(args.data_dir)

    teacher = out / "teacher"
    shutil.copytree(resolve_teacher_path(), teacher, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".git*"))
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(resolve_teacher_path() + "/model.safetensors").items()}
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})

    corpus = out / "data" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    write_lines(corpus / "sentences.txt.gz", read_text_lines(data_dir / "corpus/sentences.txt.gz", limit=args.sentences))
    passages = read_text_lines(data_dir / "corpus/passages.txt.gz")
    write_lines(corpus / "passages.txt.gz", passages[: args.passages] + passages[-args.holdout:])
    shutil.copytree(data_dir / "stsb", out / "data" / "stsb", dirs_exist_ok=True)
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f}")


if __name__ == "__main__":
    main()
