"""Fine-tune a sentence-transformers model (LAM or any other) on labelled sentence pairs.

Command line: ``python scripts/finetune.py --help``. Library use: :func:`load_pair_file`
(read and validate a training file), :func:`parse_args` and :func:`run` (train, save,
evaluate; returns the model and the report), :func:`main` (both, with user errors turned
into an exit status of 2).

Training data
-------------
Without ``--train`` the model is trained on STS-B train (scored pairs, CoSENT loss).
``--train FILE`` reads a ``.jsonl``, ``.csv`` or ``.tsv`` file whose column names (the
header line of a csv/tsv file, the keys of each jsonl object) decide the layout:

=================  ==================================  ============
layout             columns                             default loss
=================  ==================================  ============
scored pairs       ``sentence1, sentence2, score``     ``cosent``
positive pairs     ``anchor, positive``                ``mnrl``
triplets           ``anchor, positive, negative``      ``mnrl``
=================  ==================================  ============

``anchor``/``sentence1`` are interchangeable, as are ``positive``/``sentence2``;
``label`` is accepted for ``score``. Scores must lie in ``--score-range LOW HIGH``
(default 0 1) and are rescaled to 0..1. Other columns are ignored (and logged).

- ``.jsonl``: one JSON object per line; blank lines are skipped.
- ``.tsv``: the first line is the header; fields are split on tabs with no quoting
  (quote characters are kept as text, as in STS-B), so texts cannot contain tabs.
- ``.csv``: comma-separated with standard CSV double-quote quoting; the first line is
  the header.

A file is read and checked completely before the model is loaded; any problem raises
:class:`PairFileError` naming the file, the line and what was expected.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from transformers import TrainerCallback

# Importing lam_embed registers the LAM architecture with transformers, so LAM model
# folders load with SentenceTransformer(folder) like any other model.
import lam_embed  # noqa: F401
from lam_embed.data import load_stsb, looks_like_hub_name, resolve_stsb_source
from lam_embed.environment import library_versions, write_result
from lam_embed.sentence_transformer import TOKEN_MIXER_NAMES, TOKEN_MIXER_NAMES_TEXT, is_token_mixer_parameter

from .distributed import Processes

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "lam"
TEXT1_COLUMNS = ("sentence1", "anchor")
TEXT2_COLUMNS = ("sentence2", "positive")
NEGATIVE_COLUMN = "negative"
SCORE_COLUMNS = ("score", "label")
SUFFIXES = (".jsonl", ".csv", ".tsv")
LOSSES = ("cosent", "angle", "mnrl")
SCORED_LOSSES = ("cosent", "angle")
DEV_EVALUATOR_NAME = "sts-dev"
# Metric the trainer records for the dev evaluator: "eval_" + evaluator name + metric.
BEST_METRIC = f"eval_{DEV_EVALUATOR_NAME}_spearman_cosine"
EVAL_BATCH_SIZE = 64
RESULTS_FILE = "stsb_results.json"

_EXPECTED_COLUMNS = (
    "expected 'sentence1' (or 'anchor') and 'sentence2' (or 'positive'), "
    "plus 'score' (or 'label') for scored pairs or 'negative' for triplets"
)


class FinetuneError(ValueError):
    """A problem with the user's input (files, options) found before training; main() exits with 2."""


class PairFileError(FinetuneError):
    """A training file that cannot be used; the message names the file, the line and what was expected."""


# --- reading and checking training files -------------------------------------------------


def _read_jsonl(path: Path) -> tuple[list[str], int, list[tuple[int, dict[str, Any]]]]:
    """Column names (keys of the first object), the line they come from, and (line, row) pairs."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairFileError(
                    f"{path}, line {lineno}: not valid JSON ({err.msg}); expected one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise PairFileError(f"{path}, line {lineno}: expected a JSON object, found {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise PairFileError(f"{path}: the file is empty; expected one JSON object per line, {_EXPECTED_COLUMNS}")
    return list(rows[0][1]), rows[0][0], rows


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], int, list[tuple[int, dict[str, Any]]]]:
    """Header, its line number, and (line, row) pairs of a csv (quoted) or tsv (unquoted) file."""
    kind = "tab" if delimiter == "\t" else "comma"
    with open(path, encoding="utf-8-sig", newline="") as f:
        if delimiter == "\t":
            # STS-B-like text has unbalanced quote characters: split on tabs only.
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        header: list[str] | None = None
        header_line = 0
        rows: list[tuple[int, dict[str, Any]]] = []
        try:
            for fields in reader:
                lineno = reader.line_num
                if not any(field.strip() for field in fields):
                    continue
                if header is None:
                    header = [name.strip() for name in fields]
                    header_line = lineno
                    duplicates = sorted({name for name in header if header.count(name) > 1})
                    if duplicates:
                        raise PairFileError(f"{path}, line {lineno} (header): duplicate column names {duplicates}")
                    continue
                if len(fields) != len(header):
                    raise PairFileError(
                        f"{path}, line {lineno}: found {len(fields)} {kind}-separated fields, expected {len(header)} "
                        f"as in the header (line {header_line}: {header})"
                    )
                rows.append((lineno, dict(zip(header, fields))))
        except csv.Error as err:
            raise PairFileError(f"{path}, line {reader.line_num}: cannot parse as CSV ({err})") from None
    if header is None:
        raise PairFileError(
            f"{path}: the file is empty; expected a header line naming the columns, {_EXPECTED_COLUMNS}"
        )
    if not rows:
        raise PairFileError(f"{path}: the file has a header (line {header_line}) but no data rows")
    return header, header_line, rows


def _first_non_utf8_line(path: Path) -> int:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 0


def _pick(path: Path, where: str, columns: list[str], choices: tuple[str, ...], required: bool) -> str | None:
    found = [c for c in choices if c in columns]
    if len(found) > 1:
        raise PairFileError(f"{path}, {where}: columns {found} mean the same thing; keep only one of them")
    if not found and required:
        raise PairFileError(f"{path}, {where}: found columns {columns}; {_EXPECTED_COLUMNS}")
    return found[0] if found else None


def _text(path: Path, lineno: int, row: dict[str, Any], column: str) -> str:
    if column not in row:
        raise PairFileError(f"{path}, line {lineno}: missing the column {column!r}")
    value = row[column]
    if not isinstance(value, str):
        raise PairFileError(f"{path}, line {lineno}: column {column!r} must be a string, found {value!r}")
    value = value.strip()
    if not value:
        raise PairFileError(f"{path}, line {lineno}: column {column!r} is empty; expected a non-empty text")
    return value


def _score(path: Path, lineno: int, row: dict[str, Any], column: str, low: float, high: float) -> float:
    if column not in row:
        raise PairFileError(f"{path}, line {lineno}: missing the column {column!r}")
    value = row[column]
    # bool is an int subclass in Python; true/false is not a similarity score.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PairFileError(f"{path}, line {lineno}: column {column!r} must be a number, found {value!r}")
    try:
        score = float(value)
    except ValueError:
        raise PairFileError(f"{path}, line {lineno}: column {column!r} must be a number, found {value!r}") from None
    if not math.isfinite(score):
        raise PairFileError(f"{path}, line {lineno}: column {column!r} must be a finite number, found {value!r}")
    if not low <= score <= high:
        raise PairFileError(
            f"{path}, line {lineno}: {column} {score:g} is outside the declared range {low:g}..{high:g} "
            "(set the range with --score-range LOW HIGH)"
        )
    return (score - low) / (high - low)


def load_pair_file(path: str | os.PathLike, score_range: tuple[float, float] = (0.0, 1.0)) -> datasets.Dataset:
    """Read and check a training file; see the module docstring for formats and column names.

    Returns a dataset with columns ``sentence1, sentence2, score`` (score rescaled from
    ``score_range`` to 0..1) for scored pairs, ``anchor, positive`` for positive pairs or
    ``anchor, positive, negative`` for triplets. Raises :class:`PairFileError` (naming the
    file and line) for an empty file, missing columns, empty texts, non-numeric scores or
    scores outside ``score_range``, an unknown file type or a missing file.
    """
    path = Path(path)
    low, high = (float(x) for x in score_range)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise FinetuneError(f"score range {low:g}..{high:g} is invalid: expected two finite numbers LOW < HIGH")
    if not path.is_file():
        raise PairFileError(f"{path}: no such training file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PairFileError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".jsonl":
            columns, header_line, rows = _read_jsonl(path)
            where = f"line {header_line} (first object)"
        else:
            columns, header_line, rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
            where = f"line {header_line} (header)"
    except UnicodeDecodeError:
        raise PairFileError(
            f"{path}, line {_first_non_utf8_line(path)}: not UTF-8 text; save the file as UTF-8"
        ) from None

    text1 = _pick(path, where, columns, TEXT1_COLUMNS, required=True)
    text2 = _pick(path, where, columns, TEXT2_COLUMNS, required=True)
    score_col = _pick(path, where, columns, SCORE_COLUMNS, required=False)
    negative = NEGATIVE_COLUMN if NEGATIVE_COLUMN in columns else None
    if score_col and negative:
        raise PairFileError(
            f"{path}, {where}: has both {score_col!r} and {negative!r}; expected either scored pairs "
            "(sentence1, sentence2, score) or triplets (anchor, positive, negative)"
        )
    used = {text1, text2, score_col, negative}
    ignored = [c for c in columns if c not in used]
    if ignored:
        logger.info("%s: ignoring the columns %s", path, ignored)

    if score_col:
        data: dict[str, list] = {"sentence1": [], "sentence2": [], "score": []}
        for lineno, row in rows:
            data["sentence1"].append(_text(path, lineno, row, text1))
            data["sentence2"].append(_text(path, lineno, row, text2))
            data["score"].append(_score(path, lineno, row, score_col, low, high))
        features = datasets.Features(
            {
                "sentence1": datasets.Value("string"),
                "sentence2": datasets.Value("string"),
                "score": datasets.Value("float64"),
            }
        )
        layout = "scored pairs"
    else:
        names = ["anchor", "positive"] + (["negative"] if negative else [])
        sources = [text1, text2] + ([negative] if negative else [])
        data = {name: [] for name in names}
        for lineno, row in rows:
            for name, column in zip(names, sources):
                data[name].append(_text(path, lineno, row, column))
        features = datasets.Features({name: datasets.Value("string") for name in names})
        layout = "triplets" if negative else "positive pairs"
    logger.info("read %d %s from %s", len(rows), layout, path)
    return datasets.Dataset.from_dict(data, features=features)


def describe_layout(dataset: datasets.Dataset) -> str:
    """``scored pairs``, ``positive pairs`` or ``triplets``, from the columns :func:`load_pair_file` gives."""
    if "score" in dataset.column_names:
        return "scored pairs"
    return "triplets" if "negative" in dataset.column_names else "positive pairs"


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description=(
            "Fine-tune a sentence-transformers model (LAM or any other) on labelled pairs with the\n"
            "SentenceTransformerTrainer, choosing the checkpoint with the best STS-B dev Spearman\n"
            "(cosine), then report STS-B dev and test figures.\n\n"
            "Training files (--train): .jsonl (one object per line), .csv (header, CSV quoting) or\n"
            ".tsv (header, tab-separated, no quoting). Columns decide the layout:\n"
            "  sentence1, sentence2, score   scored pairs    (default loss: cosent)\n"
            "  anchor, positive              positive pairs  (default loss: mnrl)\n"
            "  anchor, positive, negative    triplets        (default loss: mnrl)\n"
            "'anchor'/'sentence1' and 'positive'/'sentence2' are interchangeable; 'label' may\n"
            "replace 'score'. Other columns are ignored. The file is checked completely before\n"
            "the model is loaded.\n\n"
            "Output folder: checkpoint-N/ (the best and the latest are kept), final/ (best model,\n"
            "with a README.md model card), eval/ (dev scores during training), trainer_state.json\n"
            f"(loss and dev score history) and {RESULTS_FILE} (settings, dev/test figures, time)."
        ),
        epilog=(
            "Examples:\n"
            "  python scripts/finetune.py --model lam --output-dir runs/lam-stsb\n"
            "  python scripts/finetune.py --model lam --train pairs.jsonl --batch-size 128\n"
            "  python scripts/finetune.py --model lam --output-dir runs/lam-stsb --resume"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="folder or hub name of a sentence-transformers model (LAM or not). Default: %(default)s "
        "(the folder 'lam' in the current directory).",
    )
    parser.add_argument(
        "--train",
        metavar="FILE",
        default=None,
        help="training file (.jsonl, .csv or .tsv; layouts above). Default: STS-B train from --stsb.",
    )
    parser.add_argument(
        "--stsb",
        metavar="SOURCE",
        default=None,
        help="STS-B source: a folder holding sts-{train,dev,test}.csv, or a hub dataset name. Used for the "
        "default training data, the dev evaluation during training and the final figures. Default: $LAM_STSB "
        "if set, else <data dir>/stsb if it exists (data dir: $LAM_DATA_DIR), "
        "else sentence-transformers/stsb.",
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default=None,
        help="cosent (CoSENTLoss) or angle (AnglELoss) for scored pairs; mnrl (MultipleNegativesRankingLoss, "
        "in-batch negatives, batches without duplicate texts) for positive pairs and triplets. "
        "Default: cosent for scored pairs, mnrl otherwise.",
    )
    parser.add_argument(
        "--score-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        default=(0.0, 1.0),
        help="range of the scores in --train; a score outside it is an error, scores are rescaled to 0..1 "
        "(e.g. --score-range 0 5 for raw STS-B scores). Not used for the default STS-B data. Default: 0 1.",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="folder for checkpoints, the final model and the results. Default: "
        "runs/finetune-<model name>-<date-time>.",
    )
    parser.add_argument("--epochs", type=float, default=4.0, help="training epochs. Default: %(default)g.")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch size. Default: 16 for scored pairs, 64 for mnrl (each batch gives the in-batch "
        "negatives, so larger batches help).",
    )
    parser.add_argument(
        "--lr", type=float, default=2e-5, help="peak learning rate (AdamW, linear decay). Default: %(default)g."
    )
    parser.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.1,
        help="fraction of the training steps with a linear learning-rate warm-up, in [0, 1). Default: %(default)g.",
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed (shuffling, dropout). Default: %(default)d.")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="stop after this many optimiser steps, overriding --epochs (for smoke tests); -1 = off. Default: -1.",
    )
    parser.add_argument(
        "--eval-steps",
        type=int,
        default=100,
        help="evaluate on STS-B dev and save a checkpoint every this many steps, and at the end; the best and "
        "the latest checkpoints are kept. Default: %(default)d.",
    )
    parser.add_argument(
        "--logging-steps",
        type=int,
        default=10,
        help="log the training loss every this many steps. Default: %(default)d.",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 mixed precision (--no-bf16 to turn off). Default: on when a CUDA GPU supports bf16, off otherwise.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --output-dir (model, optimiser, scheduler, data order); "
        "starts from scratch, with a warning, if there is none. Without --resume an output folder that "
        "already holds checkpoints is an error. Default: off.",
    )
    parser.add_argument(
        "--max-train-samples",
        type=int,
        default=None,
        help="use only the first N training rows (after checking the whole file). Default: all.",
    )
    parser.add_argument(
        "--freeze-token-mixer",
        action="store_true",
        help="train everything but the token mixer (LAM's DeltaNet; a BERT model's self-attention and its "
        "output projection): the same parameters train in LAM and in the transformer it replaces "
        "(docs/training.md compares the two ways). Default: off.",
    )
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="truncate inputs to this many tokens during training and evaluation (saved with the model). "
        "Default: the model's own max_seq_length.",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "eval_steps", "logging_steps", "max_train_samples", "max_seq_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps == 0 or args.max_steps < -1:
        parser.error("--max-steps must be >= 1, or -1 (off)")
    if args.epochs <= 0:
        parser.error("--epochs must be > 0")
    if args.lr <= 0:
        parser.error("--lr must be > 0")
    # transformers reads a warmup value below 1 as a fraction and 1 or more as a step count.
    if not 0.0 <= args.warmup_ratio < 1.0:
        parser.error("--warmup-ratio must be in [0, 1)")
    low, high = args.score_range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        parser.error("--score-range LOW HIGH needs LOW < HIGH")
    return args


# --- training ------------------------------------------------------------------------------


def _load_model(name: str):
    import torch
    from sentence_transformers import SentenceTransformer

    # float32 master weights even for a checkpoint saved in fp16/bf16: the optimiser
    # needs them, and bf16 autocast still runs the products in bf16 on the GPU.
    kwargs = {"model_kwargs": {"dtype": torch.float32}}
    if os.path.isdir(name):
        return SentenceTransformer(name, **kwargs)
    if name == DEFAULT_MODEL or not looks_like_hub_name(name):
        raise FinetuneError(
            f"model folder {name!r} does not exist (relative to {os.getcwd()}); pass --model with a model folder "
            "or a hub name"
        )
    logger.info("%s is not a local folder: loading it from the Hugging Face Hub", name)
    return SentenceTransformer(name, **kwargs)


def freeze_token_mixer(model) -> int:
    """Stop gradients to the token mixer's parameters (TOKEN_MIXER_NAMES); return how many
    values were frozen. A model without a recognised token mixer is an error."""
    frozen = 0
    for name, param in model.named_parameters():
        if is_token_mixer_parameter(name):
            param.requires_grad_(False)
            frozen += param.numel()
    if not frozen:
        raise FinetuneError(
            "--freeze-token-mixer: no token-mixer parameters in this model (looked for names containing "
            f"{TOKEN_MIXER_NAMES_TEXT})"
        )
    total = sum(p.numel() for p in model.parameters())
    logger.info("froze the token mixer: %d of %d parameters train", total - frozen, total)
    return frozen


class GatheredScoredLoss(torch.nn.Module):
    """A scored-pair loss (CoSENT, AnglE) over the global batch of a torchrun run: each
    process embeds its share, the embeddings and scores of all shares are gathered (the
    process's own rows keep their graph), and each process takes the loss of the whole batch.
    The gradient is scaled by the number of processes, so that DDP's mean of the processes'
    gradients is the gradient of the whole batch's loss, as one process on that batch has
    it; the value stays the whole batch's loss. ``model`` is read through this wrapper so
    that the trainer can swap in its DDP-wrapped model."""

    def __init__(self, loss, processes):
        super().__init__()
        self.loss = loss
        self.model = loss.model
        self.processes = processes

    def forward(self, sentence_features, labels):
        embeddings = [self.processes.gather_rows(self.model(f)["sentence_embedding"]) for f in sentence_features]
        loss = self.loss.compute_loss_from_embeddings(embeddings, self.processes.gather_rows(labels))
        return loss + (self.processes.world - 1) * (loss - loss.detach())


class ShareMetrics(TrainerCallback):
    """Gives every process the first process's evaluation metrics.

    sentence-transformers runs the evaluator on the first process; where its metrics do not
    reach the others (seen with gloo on CPU), the trainer's choice of the best checkpoint
    fails there for want of the metric. The metrics dict is updated in place, as the
    trainer reads it after the callback."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        shared = [dict(metrics) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        metrics.clear()
        metrics.update(shared[0])


def _build_loss(name: str, model, processes=None):
    """The loss ``name``; under torchrun (``processes.world`` > 1) one over the global batch."""
    # sentence-transformers >= 6 keeps losses and evaluators under sentence_transformer;
    # the old top-level modules still work there but warn.
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import losses
    several = processes is not None and processes.world > 1
    if name in ("cosent", "angle"):
        loss = losses.CoSENTLoss(model) if name == "cosent" else losses.AnglELoss(model)
        return GatheredScoredLoss(loss, processes) if several else loss
    # In-batch negatives from every process's share (sentence-transformers gathers them).
    return losses.MultipleNegativesRankingLoss(model, gather_across_devices=several)


def _dev_evaluator(dev: datasets.Dataset):
    from sentence_transformers import SimilarityFunction

    try:
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    return EmbeddingSimilarityEvaluator(
        dev["sentence1"],
        dev["sentence2"],
        dev["score"],
        batch_size=EVAL_BATCH_SIZE,
        main_similarity=SimilarityFunction.COSINE,
        similarity_fn_names=["cosine"],
        name=DEV_EVALUATOR_NAME,
    )


def _load_stsb_checked(split: str, source: str) -> datasets.Dataset:
    try:
        return load_stsb(split, source)
    except (OSError, RuntimeError, ValueError) as err:
        # load_stsb's messages name the file or source already; report them as input errors.
        raise FinetuneError(f"cannot load STS-B {split}: {err}") from err


def _default_output_dir(model: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"finetune-{Path(model.rstrip('/')).name or 'model'}-{stamp}"


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def run(args: argparse.Namespace, argv: list[str] | None = None):
    """Check the data, train, keep the best dev checkpoint, save ``final/``, evaluate, write the report.

    Returns ``(model, report)``: the trained (best) model in memory and the dict written to
    ``<output-dir>/stsb_results.json``. Input problems raise :class:`FinetuneError` (or
    :class:`PairFileError`) before the model is loaded.
    """
    import torch
    import transformers
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    try:
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.training_args import BatchSamplers

    from ..evaluation.stsb import evaluate_stsb

    # 1. Everything that can be wrong with the inputs, before the (slow) model load.
    stsb_source = resolve_stsb_source(args.stsb)
    if args.train is not None:
        train = load_pair_file(args.train, score_range=tuple(args.score_range))
        train_source = os.fspath(args.train)
    else:
        train = _load_stsb_checked("train", stsb_source)
        train_source = f"STS-B train ({stsb_source})"
    layout = describe_layout(train)
    scored = layout == "scored pairs"
    loss_name = args.loss or ("cosent" if scored else "mnrl")
    if scored and loss_name not in SCORED_LOSSES:
        raise FinetuneError(
            f"--loss {loss_name} needs positive pairs or triplets, but {train_source} holds scored pairs "
            "(a low score is not a positive pair); use --loss cosent or --loss angle"
        )
    if not scored and loss_name in SCORED_LOSSES:
        raise FinetuneError(
            f"--loss {loss_name} needs scored pairs (sentence1, sentence2, score), but {train_source} holds "
            f"{layout}; use --loss mnrl"
        )
    if args.max_train_samples is not None and args.max_train_samples < len(train):
        train = train.select(range(args.max_train_samples))
    batch_size = args.batch_size or (16 if scored else 64)
    # Under torchrun each process takes an equal share of every batch of --batch-size.
    processes = Processes(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    if batch_size % processes.world:
        raise FinetuneError(f"--batch-size {batch_size} does not divide among {processes.world} processes")
    dev = _load_stsb_checked("validation", stsb_source)

    output_dir = Path(args.output_dir) if args.output_dir else _default_output_dir(args.model)
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if args.resume and last_checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", output_dir)
    if not args.resume and last_checkpoint is not None:
        raise FinetuneError(
            f"{output_dir} already holds checkpoints (latest: {last_checkpoint}); pass --resume to continue "
            "from it, or choose another --output-dir"
        )

    # The trainer needs accelerate but only says so after the model is loaded.
    if importlib.util.find_spec("accelerate") is None:
        raise FinetuneError(
            "training needs the 'accelerate' package: pip install 'accelerate>=1.1' (or 'sentence-transformers[train]')"
        )

    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    transformers.set_seed(args.seed)
    logger.info(
        "training on %d %s from %s with %s loss, batch size %d, bf16 %s, output %s",
        len(train),
        layout,
        train_source,
        loss_name,
        batch_size,
        bf16,
        output_dir,
    )

    # 2. Model, loss, dev evaluator.
    model = _load_model(args.model)
    if args.max_seq_length is not None:
        model.max_seq_length = args.max_seq_length
    if args.freeze_token_mixer:
        freeze_token_mixer(model)
    loss = _build_loss(loss_name, model, processes)
    dev_evaluator = _dev_evaluator(dev)
    # The untrained model's dev score tells whether fine-tuning helped.
    dev_before = float(dev_evaluator(model)[f"{DEV_EVALUATOR_NAME}_spearman_cosine"])
    logger.info("STS-B dev Spearman before fine-tuning: %.4f", dev_before)

    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=batch_size // processes.world,
        per_device_eval_batch_size=batch_size,
        learning_rate=args.lr,
        # transformers 5 has no warmup_ratio; a warmup_steps value below 1 is a fraction of the steps.
        warmup_steps=args.warmup_ratio,
        seed=args.seed,
        bf16=bf16,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps,
        # With load_best_model_at_end the best checkpoint is never deleted, so 2 = best + latest.
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=BEST_METRIC,
        greater_is_better=True,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        # In-batch negatives: a duplicate text in the batch would be a false negative.
        batch_sampler=BatchSamplers.NO_DUPLICATES if loss_name == "mnrl" else BatchSamplers.BATCH_SAMPLER,
        dataloader_pin_memory=cuda,  # pinning only helps copies to a GPU; on CPU it warns
        use_cpu=not cuda,  # without it, torchrun processes on a CPU each train alone (accelerate's MULTI_CPU)
        report_to="none",
        run_name=output_dir.name,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        loss=loss,
        evaluator=dev_evaluator,
        callbacks=[ShareMetrics()] if processes.world > 1 else None,
    )

    # 3. Train; the trainer reloads the best dev checkpoint at the end.
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_checkpoint if args.resume else None)
    train_seconds = time.perf_counter() - start
    trainer.save_state()  # trainer_state.json in the output folder: loss and dev history
    model = trainer.model
    if not trainer.is_world_process_zero():
        return model, None  # the first process evaluates and writes
    logger.info(
        "kept the checkpoint with the best dev Spearman (%s): %s",
        f"{trainer.state.best_metric:.4f}" if trainer.state.best_metric is not None else "n/a",
        trainer.state.best_model_checkpoint,
    )

    # 4. Final figures on the kept model. Evaluating before saving puts them in the model card too.
    figures = evaluate_stsb(
        model, source=stsb_source, splits=("validation", "test"), batch_size=EVAL_BATCH_SIZE, name="final"
    )
    final_dir = output_dir / "final"
    model.save(str(final_dir))  # writes sentence-transformers' README.md model card as well
    if getattr(getattr(getattr(model[0], "auto_model", None), "config", None), "model_type", None) == "lam":
        _write_lam_card(final_dir, args.model, figures, argv, cuda, train_source)
    logger.info("saved the fine-tuned model to %s", final_dir)
    report = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "seed": args.seed,
        "args": {key: _jsonable(value) for key, value in vars(args).items()},
        "train_data": {"source": train_source, "layout": layout, "rows": len(train)},
        "loss": loss_name,
        "batch_size": batch_size,
        "bf16": bf16,
        "max_seq_length": model.max_seq_length,
        "stsb_source": stsb_source,
        "metric": "Spearman/Pearson correlation of cosine similarity with the gold score, in 0..1",
        "stsb_dev_spearman_before": dev_before,
        "stsb": figures,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_dev_spearman_during_training": trainer.state.best_metric,
        "global_step": trainer.state.global_step,
        "resumed_from": last_checkpoint if args.resume else None,
        # Wall time of this process's training only (not earlier runs that --resume continues).
        "train_seconds": round(train_seconds, 1),
        "final_model": str(final_dir),
        "versions": library_versions(),
    }
    results_path = output_dir / RESULTS_FILE
    write_result(results_path, report, "cuda:0" if cuda else "cpu", argv)
    logger.info(
        "STS-B Spearman: dev %.4f (before %.4f), test %.4f; wrote %s",
        figures["validation"]["spearman"],
        dev_before,
        figures["test"]["spearman"],
        results_path,
    )
    return model, report


def _write_lam_card(folder: Path, base: str, figures: dict, argv: list[str] | None, cuda: bool, train_source) -> None:
    """Replace sentence-transformers' card of a fine-tuned LAM by LAM's own (its figures beside the
    teacher's, how to load it, limits), keeping the trainer's record of the run as its appendix."""
    import torch

    from lam_embed.model_card import finetuned_model_card

    base_manifest = Path(base) / "lam_manifest.json"
    card = folder / "README.md"
    setting = f"{torch.cuda.get_device_name() if cuda else 'CPU'}, the fine-tune script's final evaluation"
    command = "python scripts/finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    card.write_text(finetuned_model_card(
        json.loads(base_manifest.read_text()) if base_manifest.is_file() else {}, figures, command, setting,
        f"`{train_source}`", card.read_text(encoding="utf-8") if card.is_file() else ""), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input files or options)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args, argv)
    except FinetuneError as err:
        # The message already says which file, line and value; a traceback adds nothing.
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
