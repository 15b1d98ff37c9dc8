"""Stage the teacher and the data in git-ignored folders for the GPU machine.

The GPU machine receives only the working tree (64 MiB a call) and not ../shared.
This writes two folders that each fit in one call:

- ``<out>/teacher``: the teacher with fp16 weights (about 43 MiB);
- ``<out>/data``: the corpus files and the STS-B csv files (about 45 MiB when whole).

Carry ``<out>/data`` in one call that copies it to /tmp on the machine, then
``<out>/teacher`` in the next call, while the machine is still warm.
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".stage", help="folder to write; keep it git-ignored (default: .stage)")
    p.add_argument("--data-dir", default=str(data) if data else None,
                   help=f"the shared data folder (default: {data})")
    p.add_argument("--sentences", type=int, default=0,
                   help="copy only the first N sentences (0: the whole file, as the distillation defaults read; default: 0)")
    p.add_argument("--passages", type=int, default=0,
                   help="copy only the first N training passages, plus the held-out ones (0: the whole file; default: 0)")
    p.add_argument("--holdout", type=int, default=1_000,
                   help="held-out passages kept at the end of the file, as in the original (default: 1000)")
    args = p.parse_args(argv)
    out = Path(args.out)
    data_dir = Path(args.data_dir)

    teacher = out / "teacher"
    shutil.copytree(resolve_teacher_path(), teacher, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".git*"))
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(resolve_teacher_path() + "/model.safetensors").items()}
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})

    corpus = out / "data" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    if args.sentences:
        write_lines(corpus / "sentences.txt.gz", read_text_lines(data_dir / "corpus/sentences.txt.gz", limit=args.sentences))
    else:
        shutil.copyfile(data_dir / "corpus/sentences.txt.gz", corpus / "sentences.txt.gz")
    if args.passages:
        passages = read_text_lines(data_dir / "corpus/passages.txt.gz")
        write_lines(corpus / "passages.txt.gz", passages[: args.passages] + passages[-args.holdout:])
    else:
        shutil.copyfile(data_dir / "corpus/passages.txt.gz", corpus / "passages.txt.gz")
    shutil.copytree(data_dir / "stsb", out / "data" / "stsb", dirs_exist_ok=True)
    for folder in (teacher, out / "data"):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{size / 2**20:8.2f} MiB  {folder}")


if __name__ == "__main__":
    main()
