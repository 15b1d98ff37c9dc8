"""Data loading shared by training and evaluation.

STS-B comes either from a local folder of the original csv files
(``sts-{train,dev,test}.csv``) or from the Hugging Face Hub
(``sentence-transformers/stsb``). Both give the same columns: ``sentence1``,
``sentence2`` and ``score`` in 0..1.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: distillation reads STS-B where `datasets` is not installed
    import datasets

logger = logging.getLogger(__name__)

STSB_HUB_NAME = "sentence-transformers/stsb"
STSB_SPLITS = ("train", "validation", "test")

# Split name -> file name in the original distribution, which calls the validation split "dev".
_STSB_FILES = {"train": "sts-train.csv", "validation": "sts-dev.csv", "test": "sts-test.csv"}
_SPLIT_ALIASES = {"dev": "validation"}


def _stsb_features():
    import datasets

    return datasets.Features(
        {"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"), "score": datasets.Value("float64")}
    )


def default_data_dir() -> Path | None:
    """The data folder named by ``$LAM_DATA_DIR`` (holding ``stsb/``, ``corpus/`` and
    ``longdoc/``), or None: the data is never looked for anywhere else."""
    env = os.environ.get("LAM_DATA_DIR")
    return Path(env).expanduser() if env else None


def canonical_split(split: str) -> str:
    """Return ``train``, ``validation`` or ``test`` for ``split`` (``dev`` means ``validation``)."""
    name = _SPLIT_ALIASES.get(split, split)
    if name not in STSB_SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(STSB_SPLITS)} (or 'dev' for 'validation')")
    return name


def resolve_stsb_source(source: str | os.PathLike | None = None) -> str:
    """Where STS-B is read from: ``source`` if given, else ``$LAM_STSB``, else the shared
    data folder's ``stsb/`` if it exists, else the hub dataset name."""
    if source is not None:
        return os.fspath(source)
    env = os.environ.get("LAM_STSB")
    if env:
        return env
    data_dir = default_data_dir()
    if data_dir is not None and (data_dir / "stsb").is_dir():
        return str(data_dir / "stsb")
    if os.environ.get("LAM_DATA_DIR"):
        # An explicit data folder without stsb/ is more likely a typo than a wish for the hub.
        logger.warning("$LAM_DATA_DIR=%s has no stsb/ folder; using the hub dataset %s", data_dir, STSB_HUB_NAME)
    return STSB_HUB_NAME


def looks_like_hub_name(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything absolute, relative to "." or "~",
    # or with more than one slash can only be meant as a local path.
    if source.startswith((".", "/", "~")) or os.path.isabs(source):
        return False
    return source.count("/") <= 1 and "\\" not in source


def load_stsb(split: str, source: str | os.PathLike | None = None) -> datasets.Dataset:
    """Load one STS-B split with columns ``sentence1``, ``sentence2``, ``score`` (float in 0..1).

    ``split`` is ``train``, ``validation`` (alias ``dev``) or ``test``. ``source`` is a
    folder holding ``sts-{train,dev,test}.csv`` or a hub dataset name; ``None`` uses
    :func:`resolve_stsb_source`.
    """
    split = canonical_split(split)
    source = resolve_stsb_source(source)
    if os.path.isdir(source):
        return _load_stsb_csv(Path(source) / _STSB_FILES[split])
    if os.path.exists(source) or not looks_like_hub_name(source):
        raise FileNotFoundError(
            f"STS-B source {source!r} is not an existing folder (expected a folder holding "
            f"{', '.join(_STSB_FILES.values())}, or a hub dataset name such as {STSB_HUB_NAME!r})"
        )
    logger.info("loading STS-B %s from the hub dataset %s", split, source)
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:
        raise RuntimeError(
            f"STS-B source {source!r} is not a local folder, and loading it as a hub dataset failed "
            f"({type(err).__name__}: {err}). "
            "Without network access, pass a local folder of sts-*.csv files (--stsb, $LAM_STSB or $LAM_DATA_DIR)."
        ) from err
    missing = {"sentence1", "sentence2", "score"} - set(ds.column_names)
    if missing:
        raise ValueError(f"hub dataset {source!r} lacks the columns {sorted(missing)}")
    return ds.select_columns(["sentence1", "sentence2", "score"]).cast(_stsb_features())


def read_stsb_pairs(path: str | os.PathLike) -> tuple[list[str], list[str], list[float]]:
    """(sentence1, sentence2, score in 0..5) lists of one original STS-B csv file.

    Plain lists, so that code that only needs the pairs (the distillation log) runs
    where the ``datasets`` package is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STS-B file {str(path)!r} does not exist")
    first, second, scores = [], [], []
    # Split on tabs by hand: sentences contain quote characters that csv quoting would swallow.
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 7:
                raise ValueError(f"{path}, line {lineno}: expected at least 7 tab-separated columns, found {len(cols)}")
            # Columns 5-7 are score, sentence1, sentence2; some lines carry trailing source notes.
            try:
                score = float(cols[4])
            except ValueError:
                raise ValueError(f"{path}, line {lineno}: score {cols[4]!r} is not a number") from None
            if not 0.0 <= score <= 5.0:
                raise ValueError(f"{path}, line {lineno}: score {score} is outside 0..5")
            first.append(cols[5].strip())
            second.append(cols[6].strip())
            scores.append(score)
    logger.info("read %d STS-B pairs from %s", len(scores), path)
    return first, second, scores


def stsb_train_sentences(folder: str | os.PathLike) -> list[str]:
    """The distinct sentences of ``folder``/sts-train.csv (never its scores), sorted so that
    every process of a run gets the same list."""
    first, second, _ = read_stsb_pairs(Path(folder) / _STSB_FILES["train"])
    return sorted(set(first) | set(second))


def _load_stsb_csv(path: Path):
    import datasets

    first, second, scores = read_stsb_pairs(path)
    rows = {"sentence1": first, "sentence2": second, "score": [x / 5.0 for x in scores]}
    return datasets.Dataset.from_dict(rows, features=_stsb_features())


def read_text_lines(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Stripped, non-empty lines of a ``.txt`` or ``.txt.gz`` file, at most ``limit`` of them."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be None or >= 0")
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    lines: list[str] = []
    if limit == 0:
        return lines
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    lines.append(line)
                    # Stop early: the corpus has ~700k lines and callers often want a sample.
                    if limit is not None and len(lines) >= limit:
                        break
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (line {len(lines) + 1} or near it: {err.reason})") from None
    return lines


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """The text's sentences (cut after '.', '!' or '?' and at line breaks), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
