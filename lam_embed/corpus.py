"""Embed a large text file, one text a line, into shards of ``.npy`` rows that an interrupted
run resumes without duplicate or missing rows.

Row i of the concatenated shards is the embedding of line i of the input (empty lines
included, so row numbers are line numbers). Each shard is written to a temporary file and
renamed when complete, so a shard file on disk is always whole; ``manifest.json`` records the
settings, and a resumed run with other settings is an error naming them. One process encodes
through ``lam_embed.encode_texts`` (the embeddings of ``encode``, with the tokenizer in
background threads and batches by a token budget); with several ``devices`` the texts are
encoded by sentence-transformers' multi-process pool, one process a device.

    lam-encode-corpus corpus.txt.gz --output-dir embeddings --devices cuda:0 cuda:1
    embeddings = lam_embed.corpus.read_embeddings("embeddings")      # (lines, 384)
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .cli import DefaultsHelpFormatter
from .inference.pipeline import encode_texts

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "lam-corpus-embeddings/1"
DTYPES = ("float32", "float16")


def read_lines(path: str | os.PathLike) -> list[str]:
    """Every line of a ``.txt`` or ``.txt.gz`` file (UTF-8), without its line break; empty lines kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    with opener(path, "rb") as f:  # bytes split at b"\n" only: a stray \r stays in its line
        for number, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text (line {number}: {err.reason})") from None
    return lines


def shard_path(output_dir: Path, index: int) -> Path:
    return output_dir / f"embeddings-{index:05d}.npy"


def _settings(input_path: Path, lines: int, model_name: str, shard_size: int, dtype: str, normalize: bool,
              dimension: int) -> dict:
    stat = input_path.stat()
    return {"format": FORMAT, "input": str(input_path.resolve()), "input_bytes": stat.st_size, "lines": lines,
            "model": model_name, "shard_size": shard_size, "dtype": dtype, "normalize": normalize,
            "dimension": dimension}


def _complete_shard(path: Path, rows: int, dimension: int, dtype: str) -> bool:
    """Whether ``path`` holds a whole shard (a file of another shape is rewritten)."""
    if not path.is_file():
        return False
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return array.shape == (rows, dimension) and array.dtype == np.dtype(dtype)


def encode_corpus(model, input_path: str | os.PathLike, output_dir: str | os.PathLike, model_name: str = "",
                  shard_size: int = 100_000, batch_size: int = 64, dtype: str = "float32", normalize: bool = True,
                  devices: Sequence[str] | None = None, show_progress_bar: bool = True) -> dict:
    """Embed every line of ``input_path`` with ``model`` (a SentenceTransformer) into shards of
    ``shard_size`` rows under ``output_dir``; shards already complete are kept. ``devices``
    (two or more): encode through a multi-process pool on them, ``batch_size`` texts a
    forward; else through ``encode_texts`` (batches by tokens). Returns the manifest."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    texts = read_lines(input_path)
    # get_embedding_dimension from sentence-transformers 6.3 on; the old name before.
    dimension = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    settings = _settings(input_path, len(texts), model_name, shard_size, dtype, normalize, dimension)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / MANIFEST
    if manifest_path.is_file():
        saved = json.loads(manifest_path.read_text())
        differing = sorted(k for k in settings if saved.get(k) != settings[k])
        if differing:
            raise ValueError(f"{output_dir} holds embeddings made with other settings ({', '.join(differing)}: "
                             f"{[saved.get(k) for k in differing]} there, {[settings[k] for k in differing]} now); "
                             "use another --output-dir or remove it")
    else:
        manifest_path.write_text(json.dumps(settings, indent=2) + "\n")
    shards = -(-len(texts) // shard_size)
    todo = [i for i in range(shards) if not _complete_shard(
        shard_path(output_dir, i), min(shard_size, len(texts) - i * shard_size), dimension, dtype)]
    logger.info("%d lines in %d shards; %d already complete", len(texts), shards, shards - len(todo))
    pool = model.start_multi_process_pool(list(devices)) if devices and len(devices) > 1 else None
    try:
        for index in tqdm(todo, desc="shards", unit="shard", disable=not show_progress_bar):
            batch = texts[index * shard_size:(index + 1) * shard_size]
            if pool is None:
                embeddings = encode_texts(model, batch, normalize_embeddings=normalize, show_progress_bar=False)
            else:
                embeddings = model.encode(batch, batch_size=batch_size, normalize_embeddings=normalize,
                                          convert_to_numpy=True, show_progress_bar=False, pool=pool)
            target = shard_path(output_dir, index)
            partial = target.with_suffix(".partial.npy")
            np.save(partial, embeddings.astype(dtype))
            os.replace(partial, target)  # a shard on disk is whole or absent
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    return settings


def read_embeddings(output_dir: str | os.PathLike) -> np.ndarray:
    """The embeddings of a finished ``encode_corpus`` run, row i for line i; an error names a missing shard."""
    output_dir = Path(output_dir)
    manifest = json.loads((output_dir / MANIFEST).read_text())
    shards = -(-manifest["lines"] // manifest["shard_size"])
    missing = [str(shard_path(output_dir, i)) for i in range(shards) if not shard_path(output_dir, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{output_dir} is incomplete: missing {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}; run encode_corpus again to finish it")
    if not shards:
        return np.zeros((0, manifest["dimension"]), dtype=manifest["dtype"])
    return np.concatenate([np.load(shard_path(output_dir, i)) for i in range(shards)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lam-encode-corpus", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("input", help="text file (.txt or .txt.gz, UTF-8), one text a line")
    p.add_argument("--output-dir", required=True, help="folder of the shards and manifest.json (created)")
    p.add_argument("--model", default=None, help="sentence-transformers folder or hub name; default: the released "
                   "LAM (lam_embed.model_path())")
    p.add_argument("--shard-size", type=int, default=100_000, help="rows a shard file")
    p.add_argument("--batch-size", type=int, default=64,
                   help="texts a forward in each process of --devices (one process batches by tokens)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the stored rows")
    p.add_argument("--no-normalize", action="store_true", help="store the embeddings without normalising them")
    p.add_argument("--device", default=None, help="torch device of a single process (default: cuda if available)")
    p.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="two or more devices (cuda:0 cuda:1, or cpu cpu): one encoding process each")
    args = p.parse_args(argv)
    if not Path(args.input).is_file():
        p.error(f"input: {args.input} does not exist")
    for option in ("shard_size", "batch_size"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')}: expected a positive integer, got {getattr(args, option)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sentence_transformers import SentenceTransformer

    from .release import model_path

    name = args.model or str(model_path())
    model = SentenceTransformer(name, device=args.device)
    try:
        settings = encode_corpus(model, args.input, args.output_dir, model_name=name, shard_size=args.shard_size,
                                 batch_size=args.batch_size, dtype=args.dtype, normalize=not args.no_normalize,
                                 devices=args.devices)
    except ValueError as err:
        p.error(str(err))
    logger.info("wrote %d rows to %s", settings["lines"], args.output_dir)
    return 0
