"""Agreement with the teacher on long inputs: mean cosine between a model's and the
teacher's embeddings of held-out passages (130-520 tokens, several 128-token chunks); and,
with ``--retrieval``, how well each model finds a passage from one of its sentences.

The passages are the last ``--holdout`` lines of the passages file, which
distillation never reads (training/distill.py, ``--passage-holdout``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from lam_embed.cli import DefaultsHelpFormatter

logger = logging.getLogger(__name__)


def held_out_passages(path: str | Path, holdout: int = 1000) -> list[str]:
    """The last ``holdout`` passages of the file."""
    from lam_embed.data import read_text_lines

    return read_text_lines(path)[-holdout:]


def teacher_agreement(model: SentenceTransformer, teacher: SentenceTransformer, passages: list[str], batch_size: int = 32) -> dict:
    """Mean, 5th percentile and minimum of the cosine between the two models' embeddings."""
    a = model.encode(passages, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True)
    b = teacher.encode(passages, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True)
    cos = (a * b).sum(1)
    return {"passages": len(passages), "mean_cosine": float(cos.mean()), "p5_cosine": float(np.percentile(cos, 5)),
            "min_cosine": float(cos.min())}


QUERY_WORDS = (8, 40)  # the length of a sentence that can be a query, in words


def sentence_queries(passages: list[str]) -> tuple[list[str], list[str]]:
    """For each passage of three or more sentences with one of QUERY_WORDS words: the middle
    such sentence as a query, and the passage without it as that query's document."""
    from lam_embed.data import split_sentences

    queries, documents = [], []
    for passage in passages:
        sentences = split_sentences(passage)
        candidates = [i for i, s in enumerate(sentences) if QUERY_WORDS[0] <= len(s.split()) <= QUERY_WORDS[1]]
        if len(sentences) < 3 or not candidates:
            continue
        i = candidates[len(candidates) // 2]
        queries.append(sentences[i])
        documents.append(" ".join(sentences[:i] + sentences[i + 1:]))
    return queries, documents


def sentence_retrieval(model: SentenceTransformer, queries: list[str], documents: list[str],
                       batch_size: int = 32) -> dict:
    """Acc@1 and nDCG@10 of query i finding document i among all the documents (ties count
    against it): whether a model's pooling of passages keeps them apart as the teacher's does."""
    from .longdoc import RetrievalTask, task_score

    q = model.encode(queries, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True)
    d = model.encode(documents, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True)
    scores = q @ d.T
    relevant = [frozenset([i]) for i in range(len(queries))]
    figures = {"queries": len(queries)}
    for metric in ("acc@1", "ndcg@10"):
        task = RetrievalTask("passages", metric, documents, queries, relevant, group="passages")
        figures[metric] = task_score(task, scores)
    return figures


def main(argv=None) -> dict:
    import lam_embed  # noqa: F401  (registers LAM with the Auto classes)
    from lam_embed.data import default_data_dir
    from lam_embed.teacher import resolve_teacher_path

    data = default_data_dir()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", help="sentence-transformers folder of the model to compare with the teacher")
    p.add_argument("--teacher", default=None,
                   help="teacher folder or hub name (default: all-MiniLM-L6-v2, the offline copy when the hub is unreachable)")
    p.add_argument("--passages", default=str(data / "corpus/passages.txt.gz") if data else None, help="passages file (.txt or .txt.gz)")
    p.add_argument("--holdout", type=int, default=1000, help="how many passages from the end of the file to use")
    p.add_argument("--max-seq-length", type=int, default=512, help="token limit of both models (the teacher's table ends at 512)")
    p.add_argument("--batch-size", type=int, default=32, help="encoding batch size")
    p.add_argument("--retrieval", action="store_true",
                   help="also score sentence -> passage retrieval for the model and the teacher: each passage's middle "
                        "sentence of 8-40 words as the query, the passage without it as the document, among all of them")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if not args.passages:
        p.error("--passages is required: no data folder found (set LAM_DATA_DIR)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    passages = held_out_passages(args.passages, args.holdout)
    queries, documents = sentence_queries(passages) if args.retrieval else ([], [])
    if args.retrieval and not queries:
        p.error(f"--retrieval: no passage of {args.passages} has three sentences and one of "
                f"{QUERY_WORDS[0]}-{QUERY_WORDS[1]} words")
    model = SentenceTransformer(args.model, device=args.device)
    teacher_path = resolve_teacher_path(args.teacher)
    teacher = SentenceTransformer(teacher_path, device=args.device)
    model.max_seq_length = teacher.max_seq_length = args.max_seq_length
    tokens = [min(len(ids), args.max_seq_length) for ids in teacher.tokenizer(passages)["input_ids"]]
    result = {"model": args.model, "teacher": teacher_path, "max_seq_length": args.max_seq_length,
              "min_tokens": min(tokens), "max_tokens": max(tokens), "mean_tokens": round(float(np.mean(tokens)), 1),
              **teacher_agreement(model, teacher, passages, args.batch_size)}
    if args.retrieval:
        result["sentence_retrieval"] = {"model": sentence_retrieval(model, queries, documents, args.batch_size),
                                        "teacher": sentence_retrieval(teacher, queries, documents, args.batch_size)}
    print(json.dumps(result, indent=2))
    if args.output:
        from lam_embed.environment import write_result

        write_result(args.output, result, model.device, argv)
    return result


if __name__ == "__main__":
    main()
