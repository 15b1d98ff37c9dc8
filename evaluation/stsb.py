"""STS-B evaluation: Spearman and Pearson correlation of cosine similarity with the gold scores.

Library use: :func:`evaluate_stsb`. Command line: :func:`main`
(``python scripts/eval_stsb.py --help``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence

from sentence_transformers import SentenceTransformer, SimilarityFunction

try:
    # sentence-transformers >= 6 keeps the evaluators here; the old path below still works
    # there but emits a DeprecationWarning.
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
except ImportError:  # sentence-transformers < 6
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

from lam_embed.data import STSB_HUB_NAME, canonical_split, load_stsb, resolve_stsb_source

logger = logging.getLogger(__name__)

_SPLIT_LABELS = {"train": "train", "validation": "dev", "test": "test"}


def evaluate_stsb(
    model: SentenceTransformer,
    source: str | os.PathLike | None = None,
    splits: Sequence[str] = ("validation", "test"),
    batch_size: int = 64,
    name: str = "",
) -> dict[str, dict[str, float]]:
    """Correlation of the cosine similarity of ``model``'s embeddings with the STS-B gold scores.

    ``source`` and the split names are as in :func:`lam_embed.data.load_stsb` (``dev`` is
    accepted for ``validation``). ``name`` only labels the log lines. Returns
    ``{split: {"spearman": float, "pearson": float}}`` keyed by the canonical split names.
    """
    # Validate every split before the first (slow) encoding pass.
    canonical = list(dict.fromkeys(canonical_split(s) for s in splits))
    results: dict[str, dict[str, float]] = {}
    for split in canonical:
        ds = load_stsb(split, source)
        ev_name = f"{name}-sts-{split}" if name else f"sts-{split}"
        evaluator = EmbeddingSimilarityEvaluator(
            list(ds["sentence1"]),
            list(ds["sentence2"]),
            list(ds["score"]),
            batch_size=batch_size,
            main_similarity=SimilarityFunction.COSINE,
            similarity_fn_names=["cosine"],
            name=ev_name,
            write_csv=False,
        )
        metrics = evaluator(model)
        # The evaluator prefixes its metric names with its own name.
        results[split] = {
            "spearman": float(metrics[f"{ev_name}_spearman_cosine"]),
            "pearson": float(metrics[f"{ev_name}_pearson_cosine"]),
        }
        logger.info(
            "%s STS-B %s (%d pairs): Spearman %.4f, Pearson %.4f",
            name or "model",
            split,
            len(ds),
            results[split]["spearman"],
            results[split]["pearson"],
        )
    return results


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="eval_stsb.py",
        description=(
            "Evaluate sentence-embedding models on STS-B: Spearman and Pearson correlation\n"
            "(x100) between the cosine similarity of the two sentence embeddings and the\n"
            "gold score. Prints one row per model."
        ),
        epilog=(
            "Example: python scripts/eval_stsb.py runs/lam-student --teacher --output runs/stsb.json\n"
            "Choose checkpoints on the dev split; report the test split once."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="model folders or hub names loadable by SentenceTransformer (LAM models included). "
        "May be omitted when --teacher is given.",
    )
    parser.add_argument(
        "--teacher",
        action="store_true",
        help="also evaluate the teacher (all-MiniLM-L6-v2, local copy when offline) in the same run, "
        "as the first row. Default: off.",
    )
    parser.add_argument(
        "--stsb",
        metavar="SOURCE",
        default=None,
        help="folder holding sts-{train,dev,test}.csv, or a hub dataset name. Default: $LAM_STSB if set, "
        f"else <data dir>/stsb if it exists (data dir: $LAM_DATA_DIR), else {STSB_HUB_NAME}.",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["validation", "test"],
        choices=["train", "validation", "dev", "test"],
        help="splits to evaluate ('dev' is the same as 'validation'). Default: validation test.",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch size. Default: 64.")
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1. Default: cuda if available, else cpu."
    )
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="truncate inputs to this many tokens. Default: keep each model's own max_seq_length.",
    )
    parser.add_argument(
        "--output",
        metavar="FILE.json",
        default=None,
        help="also write all figures, model paths, device, library versions and a timestamp to this "
        "JSON file. Default: no file.",
    )
    args = parser.parse_args(argv)
    if not args.models and not args.teacher:
        parser.error("give at least one MODEL, or --teacher")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.max_seq_length is not None and args.max_seq_length < 1:
        parser.error("--max-seq-length must be >= 1")
    return args


def _format_table(rows: list[dict], splits: list[str]) -> str:
    headers = ["model"]
    for split in splits:
        headers += [f"{_SPLIT_LABELS[split]} Spearman", f"{_SPLIT_LABELS[split]} Pearson"]
    headers.append("eval s")
    body = []
    for row in rows:
        cells = [row["label"]]
        for split in splits:
            r = row["results"][split]
            cells += [f"{100 * r['spearman']:.2f}", f"{100 * r['pearson']:.2f}"]
        cells.append(f"{row['eval_seconds']:.1f}")
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(headers)]

    def fmt(cells):
        # Model names left-aligned, figures right-aligned.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(headers), "  ".join("-" * w for w in widths), *(fmt(c) for c in body)]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    # Registers the LAM architecture so SentenceTransformer can load LAM model folders.
    import lam_embed  # noqa: F401
    from lam_embed.environment import library_versions, write_result
    from lam_embed.teacher import DEFAULT_TEACHER, resolve_teacher_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    splits = list(dict.fromkeys(canonical_split(s) for s in args.splits))
    source = resolve_stsb_source(args.stsb)
    logger.info("STS-B source: %s; splits: %s; device: %s", source, ", ".join(splits), device)

    entries = []  # (label, path as given, path loaded, is_teacher)
    if args.teacher:
        teacher_path = resolve_teacher_path()
        entries.append((f"teacher ({DEFAULT_TEACHER.split('/')[-1]})", DEFAULT_TEACHER, teacher_path, True))
    entries += [(m, m, m, False) for m in args.models]

    rows = []
    for label, given, path, is_teacher in entries:
        start = time.perf_counter()
        model = SentenceTransformer(path, device=device)
        if args.max_seq_length is not None:
            model.max_seq_length = args.max_seq_length
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        results = evaluate_stsb(model, source=source, splits=splits, batch_size=args.batch_size, name=label)
        eval_seconds = time.perf_counter() - start
        rows.append(
            {
                "label": label,
                "model": given,
                "path": str(path),
                "is_teacher": is_teacher,
                "max_seq_length": model.max_seq_length,
                "load_seconds": round(load_seconds, 2),
                "eval_seconds": round(eval_seconds, 2),
                "results": results,
            }
        )
        # Free the weights before the next model: several large models may not fit together.
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    if args.output:
        report = {
            "stsb_source": source,
            "splits": splits,
            "metric": "cosine similarity vs gold score, correlation in 0..1",
            "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length,
            "device": device,
            "versions": library_versions(),
            "models": rows,
        }
        write_result(args.output, report, device, argv)
        logger.info("wrote %s", args.output)

    print(f"STS-B, cosine similarity, correlation x100 (source: {source}, device: {device})")
    print(_format_table(rows, splits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
