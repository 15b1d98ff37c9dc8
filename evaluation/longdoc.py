"""Long-document retrieval: LongEmbed-style tasks, and the ways a user can embed a long document.

Tasks (LongEmbed, Zhu et al. 2024, "Extending Embedding Models for Long Context Retrieval"):

- ``qmsum``: a meeting's reference answer as the query, the whole meeting transcript as the
  document (the QMSum test split, used here as a development set); nDCG@10.
- ``squality``: each human summary of a story as the query, the story as the document, the
  split's stories as the candidates; ``squality-dev`` and ``squality-test``; nDCG@10.
- ``passkey``: per length L, documents of 0.75*L words of a repeated filler with one line
  "<Name>'s pass key is <digits>. ..." at a random sentence boundary; the query asks for one
  name's pass key; Acc@1 among the documents of that length.
- ``needle``: the same shape with Paul Graham's essays as the haystack and an invented fact
  (``evaluation.needles``) as the needle; the query is the fact's question.

Methods (how a document becomes something to score against a query):

- ``truncate``: the first ``max_seq_length`` tokens (the model's own limit);
- ``truncate-512``: the first 512 tokens;
- ``full``: the whole document in one pass, up to ``max_length`` tokens (only for models whose
  position table allows it, such as LAM);
- ``chunk-mean``: non-overlapping 512-token chunks, their embeddings averaged and normalised;
- ``chunk-max``: the same chunks; a document scores as its best chunk;
- ``bm25``: lexical BM25 (the ``bm25s`` package), no model.

Ranking ties are broken against the relevant documents (a relevant document ranks below every
candidate with the same score), so a model that cannot tell documents apart gets no credit.

Library use: :func:`build_tasks`, :func:`evaluate_model`, :func:`evaluate_bm25`. Command line:
``python scripts/eval_longdoc.py --help``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TASK_GROUPS = ("qmsum", "squality", "passkey", "needle")
METHODS = ("truncate", "truncate-512", "full", "chunk-mean", "chunk-max", "bm25")
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_MODELS = ("sentence-transformers/all-MiniLM-L6-v2", "lam")
WINDOW = 512  # LongEmbed's truncation and chunk length, in tokens with the special tokens
WORDS_PER_TOKEN = 0.75  # LongEmbed's word budget of a synthetic document of L tokens
DATA_FILES = {"qmsum": "qmsum_dev.json.gz", "squality": "squality.jsonl.gz", "needle": "pg_essays.jsonl.gz"}

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Invented names for the passkey documents: a first and a last name give 2,500 distinct people.
FIRST_NAMES = (
    "Ada", "Bruno", "Carmen", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kalani", "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Soren", "Tamsin",
    "Umar", "Vera", "Wendell", "Ximena", "Yusuf", "Zora", "Anselm", "Beatrix", "Cyrus", "Delphine",
    "Emeka", "Fiona", "Gideon", "Hana", "Ivo", "Jasmin", "Kofi", "Leona", "Milo", "Noor",
    "Orla", "Pavel", "Rafaela", "Stellan", "Thea", "Ulrich", "Valentina", "Wiremu", "Yara", "Zeno",
)
LAST_NAMES = (
    "Abernathy", "Bergstrom", "Castellanos", "Dubois", "Eriksen", "Fairweather", "Galloway", "Hartmann",
    "Ivanova", "Jablonski", "Kowalczyk", "Lindqvist", "Mbeki", "Nakamura", "Okonkwo", "Pemberton",
    "Quintero", "Rasmussen", "Szabo", "Thornbury", "Underhill", "Vasquez", "Whitlock", "Xiong",
    "Yamada", "Zimmermann", "Ashdown", "Brannigan", "Corvino", "Delacroix", "Esposito", "Fitzgerald",
    "Grunewald", "Haddad", "Ishikawa", "Jovanovic", "Kellerman", "Lacombe", "Moreau", "Novak",
    "Oyelaran", "Petrakis", "Ramires", "Sandoval", "Tanaka", "Ulvaeus", "Vandermeer", "Wexford",
    "Yilmaz", "Zaragoza",
)


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass
class RetrievalTask:
    """Queries, candidate documents and which documents each query should find."""

    name: str  # the result column: "qmsum", "squality-dev", "passkey-1024", ...
    metric: str  # "ndcg@10" or "acc@1"
    documents: list[str]
    queries: list[str]
    relevant: list[frozenset[int]]  # per query, indices into documents
    group: str  # tasks of one group are averaged together (the lengths of passkey and needle)
    length: int | None = None  # nominal length in tokens of a synthetic task

    def __post_init__(self):
        if len(self.queries) != len(self.relevant):
            raise ValueError(f"task {self.name}: {len(self.queries)} queries but {len(self.relevant)} relevance sets")
        for i, rel in enumerate(self.relevant):
            if not rel or not all(0 <= d < len(self.documents) for d in rel):
                raise ValueError(f"task {self.name}: query {i} has no valid relevant document ({sorted(rel)})")


def word_budget(length: int) -> int:
    """Words of a synthetic document of nominal ``length`` tokens (LongEmbed: 0.75 words a token)."""
    return int(WORDS_PER_TOKEN * length)


def _sentence_starts(words: list[str]) -> list[int]:
    """Word positions where a sentence may be inserted: the start and after each sentence end
    (the end only where the text ends a sentence, not where a budget cut it)."""
    return sorted({0} | {i + 1 for i, word in enumerate(words) if word.endswith((".", "!", "?"))})


def _insert_at_sentence_boundary(rng: random.Random, haystack: list[str], line: str) -> str:
    at = rng.choice(_sentence_starts(haystack))
    return " ".join(haystack[:at] + line.split() + haystack[at:])


def _check_sizes(kind: str, length: int, documents: int, queries: int, line_words: int) -> int:
    if documents < 1 or not 1 <= queries <= documents:
        raise ValueError(f"{kind}: expected 1 <= queries ({queries}) <= documents ({documents})")
    budget = word_budget(length)
    if budget <= line_words:
        raise ValueError(f"{kind}: length {length} gives {budget} words, too few for its {line_words}-word line")
    return budget


def passkey_task(length: int, documents: int = 100, queries: int = 50, seed: int = 0) -> RetrievalTask:
    """LongEmbed's personalised passkey retrieval at ``length`` tokens.

    Every document has exactly ``word_budget(length)`` words: the filler repeated (cut at the
    budget) with one passkey line at a random sentence boundary, each for another name. The same
    arguments give the same texts.
    """
    longest_line = 15 + 4  # the line's words with the longest names
    budget = _check_sizes("passkey", length, documents, queries, longest_line)
    if documents > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"passkey: at most {len(FIRST_NAMES) * len(LAST_NAMES)} documents (distinct names)")
    rng = random.Random(f"passkey-{seed}-{length}")
    people = rng.sample(range(len(FIRST_NAMES) * len(LAST_NAMES)), documents)
    names = [f"{FIRST_NAMES[p // len(LAST_NAMES)]} {LAST_NAMES[p % len(LAST_NAMES)]}" for p in people]
    filler = PASSKEY_FILLER.split()
    texts = []
    for name in names:
        key = rng.randint(10_000, 99_999)
        line = f"{name}'s pass key is {key}. Remember it. {key} is the pass key for {name}."
        haystack = [filler[i % len(filler)] for i in range(budget - len(line.split()))]
        texts.append(_insert_at_sentence_boundary(rng, haystack, line))
    asked = sorted(rng.sample(range(documents), queries))
    return RetrievalTask(
        name=f"passkey-{length}", metric="acc@1", documents=texts,
        queries=[f"What is the pass key for {names[i]}?" for i in asked],
        relevant=[frozenset({i}) for i in asked], group="passkey", length=length,
    )


def needle_task(haystack: str, length: int, documents: int = 100, queries: int = 50, seed: int = 0,
                needles: Sequence[tuple[str, str]] | None = None) -> RetrievalTask:
    """Needle retrieval at ``length`` tokens: each document is ``word_budget(length)`` words,
    a stretch of ``haystack`` from a random offset (wrapping around) with one needle fact at a
    random sentence boundary; each document holds another fact, a query is a fact's question."""
    if needles is None:
        from .needles import NEEDLES as needles
    if documents > len(needles):
        raise ValueError(f"needle: {documents} documents need as many needles, there are {len(needles)}")
    words = haystack.split()
    if not words:
        raise ValueError("needle: the haystack is empty")
    budget = _check_sizes("needle", length, documents, queries, max(len(fact.split()) for fact, _ in needles))
    rng = random.Random(f"needle-{seed}-{length}")
    placed = rng.sample(range(len(needles)), documents)  # the needle of each document
    texts = []
    for j in placed:
        fact = needles[j][0]
        start = rng.randrange(len(words))
        stretch = [words[(start + i) % len(words)] for i in range(budget - len(fact.split()))]
        texts.append(_insert_at_sentence_boundary(rng, stretch, fact))
    asked = sorted(rng.sample(range(documents), queries))
    return RetrievalTask(
        name=f"needle-{length}", metric="acc@1", documents=texts,
        queries=[needles[placed[i]][1] for i in asked],
        relevant=[frozenset({i}) for i in asked], group="needle", length=length,
    )


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """The JSON value of each non-empty line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    rows = []
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {lineno}: not JSON ({err})") from None
    return rows


def qmsum_task(path: str | os.PathLike) -> RetrievalTask:
    """QMSum answer -> meeting retrieval from ``qmsum_dev.json.gz`` (see the data README)."""
    path = Path(path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    try:
        ids = list(data["docs"])
        index = {meeting: i for i, meeting in enumerate(ids)}
        queries = [q["query"] for q in data["queries"]]
        relevant = [frozenset(index[m] for m in q["relevant"]) for q in data["queries"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{'docs': {{id: text}}, 'queries': [{{'query', 'relevant'}}]}} ({err!r})") from None
    return RetrievalTask("qmsum", "ndcg@10", [data["docs"][m] for m in ids], queries, relevant, group="qmsum")


def squality_task(path: str | os.PathLike, split: str) -> RetrievalTask:
    """SQuALITY summary -> story retrieval among the stories of ``split`` (every response is a query)."""
    path = Path(path)
    stories = [row for row in read_json_lines(path) if row.get("split") == split]
    if not stories:
        raise ValueError(f"{path}: no story of split {split!r}")
    queries, relevant = [], []
    try:
        for i, story in enumerate(stories):
            for question in story["questions"]:
                queries += question["responses"]
                relevant += [frozenset({i})] * len(question["responses"])
        documents = [story["text"] for story in stories]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected lines {{'split', 'text', 'questions': [{{'responses'}}]}} ({err!r})") from None
    return RetrievalTask(f"squality-{split}", "ndcg@10", documents, queries, relevant, group=f"squality-{split}")


def read_haystack(path: str | os.PathLike) -> str:
    """The essays of ``pg_essays.jsonl.gz`` concatenated, in file order."""
    path = Path(path)
    try:
        return "\n".join(row["text"] for row in read_json_lines(path))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected lines {{'name', 'text'}} ({err!r})") from None


def missing_data_files(data_dir: str | os.PathLike, tasks: Sequence[str]) -> list[Path]:
    """The data files that ``tasks`` need and ``data_dir`` lacks."""
    needed = [Path(data_dir) / DATA_FILES[t] for t in tasks if t in DATA_FILES]
    return [path for path in needed if not path.is_file()]


def build_tasks(tasks: Sequence[str], data_dir: str | os.PathLike | None, lengths: Sequence[int] = DEFAULT_LENGTHS,
                documents: int = 100, queries: int = 50, seed: int = 0) -> list[RetrievalTask]:
    """The retrieval tasks of the groups ``tasks`` (names from :data:`TASK_GROUPS`)."""
    unknown = sorted(set(tasks) - set(TASK_GROUPS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}: expected some of {', '.join(TASK_GROUPS)}")
    missing = missing_data_files(data_dir, tasks) if data_dir is not None else [t for t in tasks if t in DATA_FILES]
    if missing:
        raise FileNotFoundError(f"missing data files: {', '.join(map(str, missing))}")
    built = []
    for group in tasks:
        if group == "qmsum":
            built.append(qmsum_task(Path(data_dir) / DATA_FILES["qmsum"]))
        elif group == "squality":
            built += [squality_task(Path(data_dir) / DATA_FILES["squality"], split) for split in ("dev", "test")]
        elif group == "passkey":
            built += [passkey_task(n, documents, queries, seed) for n in lengths]
        else:
            haystack = read_haystack(Path(data_dir) / DATA_FILES["needle"])
            built += [needle_task(haystack, n, documents, queries, seed) for n in lengths]
    return built


# ---------------------------------------------------------------------------------------------
# Metrics


def _ranked_relevance(scores: np.ndarray, relevant: frozenset[int]) -> np.ndarray:
    """1/0 relevance of the candidates in rank order; ties put the relevant ones last."""
    is_relevant = np.zeros(len(scores), dtype=np.int64)
    is_relevant[list(relevant)] = 1
    # lexsort: the last key is the primary one; the sort is stable for the rest.
    return is_relevant[np.lexsort((is_relevant, -np.asarray(scores, dtype=np.float64)))]


def ndcg_at_k(scores: np.ndarray, relevant: Sequence[frozenset[int]], k: int = 10) -> np.ndarray:
    """nDCG@k of each query (binary relevance); ``scores`` is (queries, documents)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for row, rel in zip(scores, relevant):
        gains = _ranked_relevance(row, rel)[:k]
        ideal = discounts[: min(len(rel), k)].sum()
        values.append(float((gains * discounts[: len(gains)]).sum() / ideal))
    return np.array(values)


def accuracy_at_1(scores: np.ndarray, relevant: Sequence[frozenset[int]]) -> np.ndarray:
    """1 where a query's top-ranked document is relevant, else 0."""
    return np.array([float(_ranked_relevance(row, rel)[0]) for row, rel in zip(scores, relevant)])


def task_score(task: RetrievalTask, scores: np.ndarray) -> float:
    """The task's metric averaged over its queries."""
    if scores.shape != (len(task.queries), len(task.documents)):
        raise ValueError(f"task {task.name}: scores of shape {scores.shape}, expected "
                         f"({len(task.queries)}, {len(task.documents)})")
    per_query = ndcg_at_k(scores, task.relevant) if task.metric == "ndcg@10" else accuracy_at_1(scores, task.relevant)
    return float(per_query.mean())


# ---------------------------------------------------------------------------------------------
# Embedding documents with a sentence-transformers model


@dataclass(frozen=True)
class DocumentView:
    """What of a document a model reads: its first ``tokens`` tokens, or all of it in chunks
    of ``tokens`` (both counting the special tokens)."""

    kind: str  # "truncate" or "chunks"
    tokens: int


def position_limit(model) -> int | None:
    """The longest input the model's position table allows, or None (LAM: positions wrap around)."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


def method_view(model, method: str, max_length: int) -> DocumentView:
    if method == "truncate":
        return DocumentView("truncate", model.max_seq_length)
    if method == "truncate-512":
        return DocumentView("truncate", WINDOW)
    if method == "full":
        return DocumentView("truncate", max_length)
    if method in ("chunk-mean", "chunk-max"):
        return DocumentView("chunks", WINDOW)
    raise ValueError(f"method {method!r} does not embed documents with a model")


def method_label(method: str, view: DocumentView | None) -> str:
    """The method with its token count where the name does not say it: 'truncate-256', 'full-32768'."""
    if method in ("truncate", "full"):
        return f"{method}-{view.tokens}"
    return method


def tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens and without truncation."""
    # verbose=False: long documents are the point here, not a mistake to warn about.
    return tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text's own tokens ([CLS] and [SEP] for BERT)."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for at in range(len(full) - len(probe) + 1):
        if full[at:at + len(probe)] == probe:
            return full[:at], full[at + len(probe):]
    raise ValueError(f"cannot find the special tokens of {type(tokenizer).__name__}")


def view_sequences(tokenizer, token_ids: Sequence[list[int]], view: DocumentView) -> tuple[list[list[int]], np.ndarray]:
    """The model inputs of a view (special tokens added) and the document each one belongs to."""
    prefix, suffix = special_tokens(tokenizer)
    room = view.tokens - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"{view.tokens} tokens leave no room beside the special tokens")
    sequences, owner = [], []
    for doc, ids in enumerate(token_ids):
        pieces = [ids[:room]] if view.kind == "truncate" else [ids[i:i + room] for i in range(0, max(len(ids), 1), room)]
        sequences += [prefix + piece + suffix for piece in pieces]
        owner += [doc] * len(pieces)
    return sequences, np.array(owner)


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that a batch's padded size (count x longest) stays within
    ``batch_tokens``; a sequence longer than that gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def embed_sequences(model, sequences: Sequence[list[int]], batch_tokens: int, desc: str = "",
                    show_progress_bar: bool = True) -> np.ndarray:
    """Normalised float32 embeddings of token-id sequences (special tokens included), batched by tokens."""
    import torch

    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with_types = "token_type_ids" in tokenizer.model_input_names
    out = None
    batches = token_batches([len(s) for s in sequences], batch_tokens)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not show_progress_bar, leave=False):
            longest = len(sequences[batch[0]])
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: LAM reads tokens in order
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            features = {"input_ids": ids, "attention_mask": mask}
            if with_types:
                features["token_type_ids"] = torch.zeros_like(ids)
            features = {k: v.to(model.device) for k, v in features.items()}
            embedding = model(features)["sentence_embedding"].float()
            if out is None:
                out = np.zeros((len(sequences), embedding.shape[-1]), dtype=np.float32)
            out[batch] = torch.nn.functional.normalize(embedding, dim=-1).cpu().numpy()
    return out


def document_scores(query_embeddings: np.ndarray, sequence_embeddings: np.ndarray, owner: np.ndarray,
                    documents: int, pooling: str) -> np.ndarray:
    """(queries, documents) cosine scores from the embeddings of each document's sequences:
    ``mean`` averages a document's sequences and normalises, ``max`` takes its best sequence."""
    q = query_embeddings.astype(np.float64)
    e = sequence_embeddings.astype(np.float64)
    if pooling == "mean":
        summed = np.zeros((documents, e.shape[1]))
        np.add.at(summed, owner, e)
        summed /= np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
        return q @ summed.T
    if pooling == "max":
        scores = np.full((len(q), documents), -np.inf)
        np.maximum.at(scores.T, owner, (q @ e.T).T)
        return scores
    raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")


def _synchronize(model) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def evaluate_model(model, tasks: Sequence[RetrievalTask], methods: Sequence[str], max_length: int = 32768,
                   batch_tokens: int = 16384, label: str = "model", warm_passes: int = 2, done: dict | None = None,
                   on_result: Callable[[str, str, dict], None] | None = None) -> dict[str, dict[str, dict]]:
    """Score ``model`` on every task with every method.

    Returns ``{method: {task: result}}``, a result being ``{"score", "documents",
    "tokenize_seconds", "embed_seconds", "warm_embed_seconds"}``. ``tokenize_seconds`` is the
    time to tokenize the task's documents; ``embed_seconds`` the time to embed what the method
    reads of them the first time, kernel compilation and per-shape set-up included (chunk-mean
    and chunk-max read the same chunks, and each counts them in full). With ``warm_passes`` > 0
    the same inputs are embedded that many times more and the last pass's time is
    ``warm_embed_seconds`` (LAM captures a CUDA graph for a shape seen twice and replays it
    from the third time on: two passes reach its steady state). ``done`` holds results already
    known, by method and task, which are kept and not computed again; ``on_result(method, task,
    result)`` sees each new one.
    """
    views = {m: method_view(model, m, max_length) for m in methods}
    tokenizer = model.tokenizer
    query_view = DocumentView("truncate", model.max_seq_length)
    results = {m: dict((done or {}).get(m, {})) for m in methods}

    def embed(sequences, desc=""):
        embeddings = embed_sequences(model, sequences, batch_tokens, desc=desc, show_progress_bar=bool(desc))
        _synchronize(model)
        return embeddings

    for task in tasks:
        todo = [m for m in methods if task.name not in results[m]]
        if not todo:
            continue
        queries, _ = view_sequences(tokenizer, tokenize(tokenizer, task.queries), query_view)
        query_embeddings = embed(queries)
        token_ids, tokenize_seconds = _timed(tokenize, tokenizer, task.documents)
        embedded = {}  # view -> (embeddings, owner, seconds, warm seconds)
        for method in todo:
            view = views[method]
            if view not in embedded:
                sequences, owner = view_sequences(tokenizer, token_ids, view)
                desc = f"{label} {method_label(method, view)} {task.name}"
                embeddings, seconds = _timed(embed, sequences, desc)
                warm_seconds = None
                for _ in range(warm_passes):
                    warm_seconds = _timed(embed, sequences, desc + " (warm)")[1]
                embedded[view] = (embeddings, owner, seconds, warm_seconds)
            embeddings, owner, seconds, warm_seconds = embedded[view]
            pooling = "max" if method == "chunk-max" else "mean"
            scores = document_scores(query_embeddings, embeddings, owner, len(task.documents), pooling)
            result = {"score": task_score(task, scores), "documents": len(task.documents),
                      "tokenize_seconds": tokenize_seconds, "embed_seconds": seconds, "warm_embed_seconds": warm_seconds}
            results[method][task.name] = result
            if on_result is not None:
                on_result(method, task.name, result)
            logger.info("%s %s %s: %s %.4f", label, method_label(method, view), task.name, task.metric, result["score"])
    return results


def evaluate_bm25(tasks: Sequence[RetrievalTask], warm_passes: int = 2, done: dict | None = None,
                  on_result: Callable[[str, str, dict], None] | None = None) -> dict[str, dict]:
    """BM25 (``bm25s``, English stopwords) on every task, ``{task: result}`` as in
    :func:`evaluate_model`; tokenizing the documents is the tokenize time, indexing them the
    embed time."""
    import bm25s

    def index(tokens):
        retriever = bm25s.BM25()
        retriever.index(tokens, show_progress=False)
        return retriever

    results = dict(done or {})
    for task in tqdm(tasks, desc="bm25", leave=False):
        if task.name in results:
            continue
        tokens, tokenize_seconds = _timed(bm25s.tokenize, task.documents, stopwords="en", show_progress=False)
        retriever, seconds = _timed(index, tokens)
        query_tokens = bm25s.tokenize(task.queries, stopwords="en", return_ids=False, show_progress=False)
        scores = np.stack([retriever.get_scores(tokens) for tokens in query_tokens])
        results[task.name] = {"score": task_score(task, scores), "documents": len(task.documents),
                              "tokenize_seconds": tokenize_seconds, "embed_seconds": seconds,
                              "warm_embed_seconds": None}
        for _ in range(warm_passes):
            results[task.name]["warm_embed_seconds"] = _timed(index, tokens)[1]
        if on_result is not None:
            on_result("bm25", task.name, results[task.name])
    return results


# ---------------------------------------------------------------------------------------------
# Table


def _length_label(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def table_columns(tasks: Sequence[RetrievalTask]) -> list[tuple[str, list[str]]]:
    """(header, task names averaged in that column) in table order: each task, and after the
    lengths of a group their mean."""
    columns, groups = [], {}
    for task in tasks:
        groups.setdefault(task.group, []).append(task)
    titles = {"qmsum": "QMSum", "squality-dev": "SQuALITY dev", "squality-test": "SQuALITY test"}
    for group, members in groups.items():
        if members[0].length is None:
            columns.append((titles.get(group, group), [members[0].name]))
            continue
        columns += [(f"{group} {_length_label(t.length)}", [t.name]) for t in members]
        columns.append((f"{group} mean", [t.name for t in members]))
    return columns


def summarise_row(results: dict[str, dict], columns: list[tuple[str, list[str]]]) -> dict:
    """A row's column values (x100), and its documents, seconds and documents per second over all
    tasks: first pass (tokenize + embed) and, where measured, warm (tokenize + warm embed)."""
    values = {header: 100 * float(np.mean([results[n]["score"] for n in names])) for header, names in columns}
    documents = sum(r["documents"] for r in results.values())
    seconds = sum(r["tokenize_seconds"] + r["embed_seconds"] for r in results.values())
    row = {"columns": values, "documents": documents, "seconds": seconds,
           "documents_per_second": documents / seconds if seconds > 0 else math.inf}
    if all(r["warm_embed_seconds"] is not None for r in results.values()):
        warm = sum(r["tokenize_seconds"] + r["warm_embed_seconds"] for r in results.values())
        row.update(warm_seconds=warm, warm_documents_per_second=documents / warm if warm > 0 else math.inf)
    return row


def format_table(rows: Sequence[dict], columns: list[tuple[str, list[str]]]) -> str:
    """A markdown table: one row per (model, method), the columns of ``table_columns``, documents
    per second (first pass, and warm where every row has it)."""
    warm = all("warm_documents_per_second" in row for row in rows)
    headers = ["model", "method", *(h for h, _ in columns), "docs/s", *(["docs/s warm"] if warm else [])]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["model"], row["method"], *(f"{row['columns'][h]:.1f}" for h, _ in columns),
                 f"{row['documents_per_second']:,.0f}", *([f"{row['warm_documents_per_second']:,.0f}"] if warm else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

SCHEMA = "lam-longdoc/1"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _repeat_cap(text: str):
    """--token-repeat-cap: 'none' (off, returned as 0) or a positive count."""
    return 0 if text.lower() == "none" else _positive(text)


def _parse_args(argv):
    from lam_embed.configuration_lam import POSITION_OVERFLOW
    from lam_embed.data import default_data_dir
    from lam_embed.sentence_transformer import POOLING_MODES

    data = default_data_dir()
    default_data = data / "longdoc" if data is not None else None
    p = argparse.ArgumentParser(
        prog="eval_longdoc.py",
        description="Long-document retrieval (LongEmbed-style QMSum, SQuALITY, passkey and needle tasks) "
                    "for sentence-transformers models, each with several ways of embedding a long document, "
                    "and BM25. Prints one table (x100; nDCG@10 for QMSum and SQuALITY, Acc@1 for passkey and "
                    "needle) and writes all figures to JSON.",
        epilog="Methods: truncate = the model's own max_seq_length; truncate-512 = the first 512 tokens; "
               "full = the whole document up to --max-length tokens in one pass (models without a position "
               "limit, such as LAM; skipped for others); chunk-mean = 512-token chunks, embeddings averaged; "
               "chunk-max = a document scores as its best 512-token chunk; bm25 = lexical BM25. "
               "Ties in a ranking count against the relevant document.",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                   help="sentence-transformers folders or hub names (LAM folders included; 'lam' is the folder "
                        "written by scripts/assemble_lam.py). Default: %(default)s")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"methods to run, from {', '.join(METHODS)}. Default: all")
    p.add_argument("--tasks", nargs="+", choices=TASK_GROUPS, default=list(TASK_GROUPS), metavar="TASK",
                   help=f"tasks to run, from {', '.join(TASK_GROUPS)} (squality is its dev and test splits). "
                        "Default: all")
    p.add_argument("--lengths", nargs="+", type=_positive, default=list(DEFAULT_LENGTHS), metavar="TOKENS",
                   help="nominal lengths in tokens of the passkey and needle documents (at least 64). "
                        "Default: %(default)s")
    p.add_argument("--documents-per-length", type=_positive, default=100,
                   help="passkey and needle documents per length. Default: %(default)s")
    p.add_argument("--queries-per-length", type=_positive, default=50,
                   help="passkey and needle queries per length. Default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey and needle generators. Default: %(default)s")
    p.add_argument("--max-length", type=_positive, default=32768,
                   help="token limit of the 'full' method. Default: %(default)s")
    p.add_argument("--data-dir", default=str(default_data) if default_data else None,
                   help="folder of qmsum_dev.json.gz, squality.jsonl.gz and pg_essays.jsonl.gz. Default: "
                        f"$LAM_DATA_DIR/longdoc (here: {default_data})")
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1). Default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="weights and compute dtype of the models. Default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch-tokens", type=_positive, default=None,
                   help="padded tokens per forward batch (a longer document gets a batch of its own). "
                        "Default: 131072 on cuda, 16384 on cpu")
    p.add_argument("--warm-passes", type=int, default=2,
                   help="after the first pass (which gives the scores and 'docs/s'), embed the same documents this "
                        "many times more and report the last pass as 'docs/s warm'; 0: no warm column. LAM "
                        "captures a CUDA graph for a shape seen twice and replays it from the third time on. "
                        "Default: %(default)s"),
    p.add_argument("--pooling", choices=POOLING_MODES, default=None,
                   help="replace each model's pooling with sentence-transformers' Pooling of this mode, for "
                        "comparing poolings without training. Default: each model's own")
    p.add_argument("--position-overflow", choices=POSITION_OVERFLOW, default=None,
                   help="for LAM models, how positions past the position table read it (LAMConfig."
                        "position_overflow). Default: each model's own")
    p.add_argument("--token-repeat-cap", type=_repeat_cap, default=None, metavar="N|none",
                   help="for LAM models, the token repeat cap of mean pooling (LAMConfig.token_repeat_cap: no "
                        "token id weighs more than N occurrences); 'none' turns it off. Default: each model's own")
    p.add_argument("--output", metavar="FILE.json", default=None,
                   help="write the table's figures, per-task results, settings and environment to this JSON "
                        "file. While running, finished results are kept in FILE.json.partial. Default: no file")
    p.add_argument("--resume", action="store_true",
                   help="reuse the results in FILE.json.partial of an interrupted run with the same settings. "
                        "Default: off")
    args = p.parse_args(argv)
    if args.queries_per_length > args.documents_per_length:
        p.error("--queries-per-length must not exceed --documents-per-length")
    if set(args.tasks) & {"passkey", "needle"} and min(args.lengths) < 64:
        p.error(f"--lengths: at least 64 tokens, got {min(args.lengths)}")
    if set(args.tasks) & set(DATA_FILES):
        if args.data_dir is None:
            p.error("--data-dir is required: no data folder found (set LAM_DATA_DIR or pass --data-dir)")
        missing = missing_data_files(args.data_dir, args.tasks)
        if missing:
            p.error("--data-dir: missing " + ", ".join(str(m) for m in missing))
    if args.warm_passes < 0:
        p.error(f"--warm-passes: expected 0 or more, got {args.warm_passes}")
    if args.resume and not args.output:
        p.error("--resume needs --output (the checkpoint is FILE.json.partial)")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            p.error(f"--output {out} is a folder; expected a file name")
        if not out.parent.is_dir():
            p.error(f"--output: the folder {out.parent} does not exist")
    if args.methods == ["bm25"] or not args.models:
        args.models = []
    return p, args


def _load_model(parser, name: str, device: str, dtype: str, pooling: str | None = None,
                position_overflow: str | None = None, token_repeat_cap: int | None = None):
    """SentenceTransformer of ``name`` on ``device`` in ``dtype``, or a usage error naming it;
    with ``pooling`` its pooling module replaced by one of that mode, with ``position_overflow``
    and ``token_repeat_cap`` (LAM models; a cap of 0 turns it off) those config fields set."""
    import torch
    from sentence_transformers import SentenceTransformer

    from lam_embed.data import looks_like_hub_name
    from lam_embed.sentence_transformer import set_pooling
    from lam_embed.teacher import DEFAULT_TEACHER, resolve_teacher_path

    try:
        path = resolve_teacher_path(DEFAULT_TEACHER) if name in (DEFAULT_TEACHER, DEFAULT_TEACHER.split("/")[1]) else name
        if not os.path.isdir(path) and not looks_like_hub_name(path):
            raise FileNotFoundError(f"no folder {path}")
        model = SentenceTransformer(path, device=device)
    except Exception as err:  # a missing folder, a hub failure, a broken config: all mean "cannot load"
        hint = " (build the released LAM with: python scripts/assemble_lam.py)" if name == "lam" else ""
        parser.error(f"--models: cannot load {name!r}{hint}: {type(err).__name__}: {err}")
    if not hasattr(model, "tokenizer") or model.tokenizer is None:
        parser.error(f"--models: {name!r} has no tokenizer; expected a text model")
    if pooling is not None:
        try:
            set_pooling(model, pooling)
        except ValueError as err:
            parser.error(f"--pooling: {name!r}: {err}")
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    if position_overflow is not None and getattr(config, "model_type", None) == "lam":
        config.position_overflow = position_overflow
    if token_repeat_cap is not None and getattr(config, "model_type", None) == "lam":
        config.token_repeat_cap = token_repeat_cap or None
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    return model.eval()


def main(argv=None) -> int:
    parser, args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "bm25" in args.methods:
        import bm25s  # noqa: F401  (its import sets its logger to DEBUG, which logs every index build)

        logging.getLogger("bm25s").setLevel(logging.WARNING)

    import torch

    import lam_embed  # noqa: F401  (registers LAM with the Auto classes)
    from lam_embed.environment import library_versions, write_json, write_result

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    batch_tokens = args.batch_tokens or (131072 if device.startswith("cuda") else 16384)
    try:
        tasks = build_tasks(args.tasks, args.data_dir, args.lengths, args.documents_per_length,
                            args.queries_per_length, args.seed)
    except (OSError, ValueError) as err:
        parser.error(f"--data-dir: {err}")
    model_methods = [m for m in args.methods if m != "bm25"]
    models = {name: _load_model(parser, name, device, dtype, args.pooling, args.position_overflow,
                                 args.token_repeat_cap)
              for name in (args.models if model_methods else [])}

    settings = {"models": args.models, "methods": args.methods, "tasks": args.tasks, "lengths": args.lengths,
                "documents_per_length": args.documents_per_length, "queries_per_length": args.queries_per_length,
                "seed": args.seed, "max_length": args.max_length, "device": device, "dtype": dtype,
                "batch_tokens": batch_tokens, "warm_passes": args.warm_passes, "data_dir": args.data_dir,
                "pooling": args.pooling, "position_overflow": args.position_overflow,
                "token_repeat_cap": args.token_repeat_cap}
    partial_path = Path(args.output + ".partial") if args.output else None
    done: dict[str, dict] = {}  # "model|method" -> {task: result}
    if args.resume and partial_path.is_file():
        saved = json.loads(partial_path.read_text())
        if saved.get("settings") != settings:
            parser.error(f"--resume: {partial_path} was written with other settings; remove it or run without --resume")
        done = saved["results"]
        logger.info("resuming: %d results from %s", sum(map(len, done.values())), partial_path)

    def keep(model_name: str) -> Callable[[str, str, dict], None]:
        def on_result(method: str, task: str, result: dict) -> None:
            done.setdefault(f"{model_name}|{method}", {})[task] = result
            if partial_path is not None:
                write_json(partial_path, {"settings": settings, "results": done})
        return on_result

    columns = table_columns(tasks)
    rows, skipped = [], []
    for name, model in models.items():
        label = Path(name).name or name
        limit = position_limit(model)
        methods = []
        for method in model_methods:
            view = method_view(model, method, args.max_length)
            if limit is not None and view.tokens > limit:
                skipped.append({"model": name, "method": method,
                                "reason": f"{view.tokens} tokens exceed the model's {limit} positions"})
                logger.warning("skipping %s %s: %s", label, method, skipped[-1]["reason"])
            elif method == "truncate" and model.max_seq_length == WINDOW and "truncate-512" in model_methods:
                skipped.append({"model": name, "method": method, "reason": "the same as truncate-512"})
            else:
                methods.append(method)
        if not methods:
            continue
        # Compile kernels and allocate before timing: cold start is not what the figures compare.
        embed_sequences(model, [[1] * 64, [1] * min(limit or WINDOW, WINDOW)], batch_tokens, show_progress_bar=False)
        known = {m: done.get(f"{name}|{m}", {}) for m in methods}
        results = evaluate_model(model, tasks, methods, args.max_length, batch_tokens, label, args.warm_passes,
                                 known, keep(name))
        for method in methods:
            view = method_view(model, method, args.max_length)
            rows.append({"model": label, "path": name, "method": method_label(method, view), "tokens": view.tokens,
                         "results": results[method], **summarise_row(results[method], columns)})
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "bm25" in args.methods:
        results = evaluate_bm25(tasks, args.warm_passes, done.get("bm25|bm25"), keep("bm25"))
        rows.append({"model": "-", "path": None, "method": "bm25", "tokens": None, "results": results,
                     **summarise_row(results, columns)})

    print(f"Long-document retrieval (x100; device {device}, {dtype}; nDCG@10 for QMSum and SQuALITY, "
          f"Acc@1 for passkey and needle)")
    print(format_table(rows, columns))
    if args.output:
        report = {
            "schema": SCHEMA,
            "versions": library_versions(),
            "settings": settings,
            "tasks": {t.name: {"metric": t.metric, "documents": len(t.documents), "queries": len(t.queries),
                               "length": t.length} for t in tasks},
            "columns": [header for header, _ in columns],
            "rows": rows,
            "skipped": skipped,
        }
        write_result(args.output, report, device, argv)
        partial_path.unlink(missing_ok=True)
        logger.info("wrote %s", args.output)
    return 0
