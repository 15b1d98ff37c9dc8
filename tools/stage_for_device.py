"""Stage the teacher and the data in git-ignored folders for the GPU machine.

The GPU machine receives only the working tree (64 MiB a call) and not ../shared.
This writes two folders that each fit in one call:

- ``<out>/teacher``: the teacher with fp16 weights (about 43 MiB); with ``--teacher-parts
  N``, its weights as N shards of transformers' sharded layout, the first in
  ``<out>/teacher`` beside the configuration and tokenizer, the others in
  ``<out>/teacher-2`` ... ``<out>/teacher-N`` (each with the index), for when the working
  tree leaves less than 43 MiB to a call;
- ``<out>/data``: the corpus files and the STS-B csv files (about 45 MiB when whole);
- ``<out>/longdoc``: the long-document files (about 27 MiB), with ``--longdoc``.

Carry ``<out>/data`` in one call that copies it to /tmp on the machine, then each teacher
folder in the next calls (copying all parts into one folder), while the machine is still warm.
"""

import argparse
import gzip
import json
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
    p.add_argument("--longdoc", action="store_true",
                   help="also copy the long-document folder (training articles and evaluation sets) to <out>/longdoc")
    p.add_argument("--teacher-parts", type=int, default=1,
                   help="split the teacher's weights over this many folders, one shard each (default: 1)")
    args = p.parse_args(argv)
    if args.teacher_parts < 1:
        p.error(f"--teacher-parts must be at least 1, got {args.teacher_parts}")
    if not args.data_dir or not Path(args.data_dir).is_dir():
        p.error(f"--data-dir: no folder {args.data_dir} (pass it, or set LAM_DATA_DIR)")
    out = Path(args.out)
    data_dir = Path(args.data_dir)

    teacher = out / "teacher"
    shutil.copytree(resolve_teacher_path(), teacher, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".git*"))
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(resolve_teacher_path() + "/model.safetensors").items()}
    if args.teacher_parts == 1:
        save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
        teachers = [teacher]
    else:
        # Tensors spread over the parts, largest first onto the lightest part: N shards of
        # transformers' sharded layout, the index beside each, the rest in the first part.
        N, sizes = args.teacher_parts, [0] * args.teacher_parts
        names = [f"model-{n + 1:05d}-of-{N:05d}.safetensors" for n in range(N)]
        parts, weight_map = [{} for _ in range(N)], {}
        for key, tensor in sorted(weights.items(), key=lambda kv: -kv[1].numel() * kv[1].element_size()):
            n = sizes.index(min(sizes))
            parts[n][key] = tensor
            sizes[n] += tensor.numel() * tensor.element_size()
            weight_map[key] = names[n]
        index = json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))},
                           indent=2)
        teachers = [teacher] + [out / f"{teacher.name}-{n + 1}" for n in range(1, N)]
        for folder, part, name in zip(teachers, parts, names):
            folder.mkdir(parents=True, exist_ok=True)
            save_file(part, folder / name, metadata={"format": "pt"})
            (folder / "model.safetensors.index.json").write_text(index + "\n")

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
    folders = [*teachers, out / "data"]
    if args.longdoc:
        shutil.copytree(data_dir / "longdoc", out / "longdoc", dirs_exist_ok=True)
        folders.append(out / "longdoc")
    for folder in folders:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{size / 2**20:8.2f} MiB  {folder}")


if __name__ == "__main__":
    main()
