"""Corpus-scale encoding: the embeddings of ``SentenceTransformer.encode``, with the host's
work kept out of the accelerator's way.

``SentenceTransformer.encode`` tokenizes each batch through the tokenizer's Python front
end in the main thread and brings each batch's embeddings to the host before it starts the
next, so a GPU that embeds a batch in a fraction of the time it takes to tokenize it waits
on the host for most of the run. ``encode_texts``:

- tokenizes with the tokenizer's Rust backend (``encode_batch_fast``: ids only, no offsets),
  block by block in background threads that run ahead of the model (the backend releases
  the GIL while it tokenizes, not while it reads a block's texts and builds its id lists:
  several blocks at a time keep its cores busy meanwhile); blocks are bounded in texts and
  in characters, so that the model starts after a small first block and long documents
  overlap their tokenization with the model's work; the ids of a few texts are checked
  against the module's own tokenization at a model's first call (and again when its
  tokenizer or length limit changes), and any difference sends its calls through the
  module's own; with ``tokenizer_processes`` each thread hands its blocks to a worker
  process (``tokenizer_processes.py``), where the tokenizer's own Python work (its output
  turned into lists, the lists into an array) does not hold the interpreter lock that the
  main thread needs to launch the model's work;
- orders texts by length and forms batches by a token budget: a batch of texts of padded
  length ``n`` holds ``batch_tokens // n`` of them, so short texts come many to a batch and
  long ones few, padding stays small, and each length bucket has one batch size (for LAM,
  whose CUDA graphs are kept per shape, that means few shapes, each seen many times; a
  batch past ``cuda_graphs.MAX_SHAPE_TOKENS`` runs eagerly, its kernels outlasting the
  launch work); a block's last, partial batch is completed with the next block's texts,
  so the batches are as full as those of one pass over all texts;
- copies each batch to the device from pinned memory without waiting, and keeps the
  embeddings on the device, in input order, until the end: one transfer to the host.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from .tokenization import FastTokenizer, TokenIds, first_module, tokenizer_runs_serially
from .tokenizer_processes import TokenizerProcesses

logger = logging.getLogger(__name__)

PREFETCH_BLOCKS = 2  # blocks the tokenizer may run ahead of the model, besides one a thread
CHECK_TEXTS = 16  # texts whose fast-path ids are compared with the module's tokenization
# Characters of each checked text: the comparison tests normalisation and word splitting, which
# a text's start shows as well as its whole (truncation has a text of its own); whole long
# documents made the check a quarter of a second of a process's first call (docs/performance.md).
CHECK_CHARACTERS = 2000


def _check_arguments(texts, **limits: int) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a string, got {type(text).__name__}")
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return list(texts)


def module_features(model, texts: list[str]) -> dict:
    """The model's own tokenization of ``texts`` (``preprocess`` from sentence-transformers 6.3
    on, ``tokenize`` before)."""
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


def _module_ids(model, texts: list[str]) -> list[list[int]]:
    """Token ids as the model's own tokenization gives them, padding removed."""
    features = module_features(model, texts)
    ids, mask = features["input_ids"], features["attention_mask"]
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]


# The choice of select_tokenizer for each first module: (tokenizer, limit, FastTokenizer or None).
# Building the backend and checking it cost as much as tokenizing a few hundred passages
# (the check pads its texts to the longest), so it is made once per module, not per call.
_selected_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def select_tokenizer(model, texts: list[str]):
    """A function texts -> ids: the fast backend when the tokenizer has one and it gives the
    module's own ids on the start of the first CHECK_TEXTS texts (and on a text longer than
    the limit), else the module's own tokenization. Chosen at a module's first call, and again
    when its tokenizer or its max_seq_length changes."""
    module = first_module(model)
    tokenizer = module.tokenizer
    # A module without max_seq_length truncates at the tokenizer's own limit.
    limit = module.max_seq_length or tokenizer.model_max_length
    chosen = _selected_tokenizers.get(module)
    if chosen is None or chosen[0] is not tokenizer or chosen[1] != limit:
        fast = None
        if getattr(tokenizer, "is_fast", False):
            fast = FastTokenizer(tokenizer, limit)
            sample = [text[:CHECK_CHARACTERS] for text in texts[:CHECK_TEXTS]]
            # Past the limit, with halves that differ: truncation, and on which side.
            words = min(limit, 10_000)
            sample.append(" ".join(["word"] * words + ["text"] * words))
            if fast(sample) != _module_ids(model, sample):
                logger.warning("the tokenizer's fast backend gives other ids than the model's tokenization; "
                               "encoding through the model's own (slower)")
                fast = None
        chosen = _selected_tokenizers[module] = (tokenizer, limit, fast)
    return chosen[2] if chosen[2] is not None else (lambda batch: _module_ids(model, batch))


# The worker processes of each first module's fast tokenizer, started at its first call with
# processes and kept for the next calls; replaced when the tokenizer or the count changes, closed
# when the module is collected (the value holds the tokenizer, never the module).
_tokenizer_processes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_processes_of(model, tokenizer: FastTokenizer, processes: int) -> TokenizerProcesses:
    """``processes`` worker processes running ``tokenizer`` (the model's chosen one), the
    cores shared among them."""
    module = first_module(model)
    running = _tokenizer_processes.get(module)
    if running is None or running.tokenizer is not tokenizer or running.processes != processes:
        if running is not None:
            running.close()
        rayon_threads = max(1, (os.cpu_count() or 1) // processes)
        running = _tokenizer_processes[module] = TokenizerProcesses(tokenizer, processes, rayon_threads)
    return running


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, max_batch_size: int,
                         round_to: int = 16) -> list[np.ndarray]:
    """Positions (into ``lengths``) of each batch: by length, longest first; a batch whose
    longest text has ``n`` tokens (rounded up to ``round_to``) holds at most
    ``batch_tokens // n`` texts and at most ``max_batch_size``, and at least one."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = -(-int(lengths[order[start]]) // round_to) * round_to
        size = max(1, min(max_batch_size, batch_tokens // max(longest, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


def _block_positions(characters: np.ndarray, order: np.ndarray, block_texts: int,
                     block_characters: int) -> Iterator[np.ndarray]:
    """Positions (into ``characters``, the texts' lengths) of consecutive blocks of ``order``:
    at most ``block_texts`` texts and ``block_characters`` characters each, and at least one
    text. Found from the running sum of the lengths, without a Python step per text."""
    ends = np.cumsum(characters[order])
    start = 0
    while start < len(order):
        before = int(ends[start - 1]) if start else 0
        end = int(np.searchsorted(ends, before + block_characters, side="right"))
        end = max(start + 1, min(end, start + block_texts))
        yield order[start:end]
        start = end


def _tokenized_blocks(texts: list[str], blocks: Iterator[np.ndarray], tokenize,
                      threads: int) -> Iterator[tuple[np.ndarray, TokenIds]]:
    """(positions, ids) of each block, in order, tokenized (``tokenize``: texts -> TokenIds)
    by ``threads`` background threads at most ``threads + PREFETCH_BLOCKS`` blocks ahead; an
    exception in a thread is raised here. Several threads help although the backend runs
    each call on all cores: a call holds the interpreter lock while it reads its texts and
    builds its id lists, and another call's backend work goes on meanwhile."""
    with ThreadPoolExecutor(threads, thread_name_prefix="lam-tokenize") as pool:
        pending: deque = deque()

        def submit(positions: np.ndarray) -> None:
            block = [texts[i] for i in positions]
            pending.append((positions, pool.submit(tokenize, block)))

        for positions in itertools.islice(blocks, threads + PREFETCH_BLOCKS):
            submit(positions)
        try:
            while pending:
                positions, future = pending.popleft()
                following = next(blocks, None)
                if following is not None:
                    submit(following)
                yield positions, future.result()
        finally:  # a call that ends early (an error, a closed generator) drops the blocks not begun
            for _, future in pending:
                future.cancel()


def _batches_across_blocks(blocks: Iterator[tuple[np.ndarray, TokenIds]], batch_tokens: int,
                           max_batch_size: int) -> Iterator[tuple[np.ndarray, TokenIds, np.ndarray]]:
    """(text positions, ids, batch) of each batch of ``blocks``' texts, ``batch`` indexing
    the other two. A block's last batch (its shortest texts, most often a partial batch) is
    held back and batched with the next block, whose texts follow them in the length order:
    the batches come out nearly as full and as few as those of one pass over all texts,
    where each block's own remainder would add a small batch (on a GPU, one more shape for
    the CUDA graphs to capture when the texts are new)."""
    held_positions, held_ids, last = np.empty(0, dtype=np.int64), TokenIds.from_lists([]), None
    for positions, ids in blocks:
        positions, ids = np.concatenate([held_positions, positions]), TokenIds.concatenate(held_ids, ids)
        *batches, last = token_budget_batches(ids.lengths, batch_tokens, max_batch_size)
        for batch in batches:
            yield positions, ids, batch
        held_positions, held_ids = positions[last], ids.select(last)
    if last is not None:  # the last block's last batch has no block to wait for
        yield positions, ids, last


def _features_for(template: dict, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The module's feature dict for these ids: every tensor entry of the template replaced."""
    features = {}
    for key, value in template.items():
        if key == "input_ids":
            features[key] = ids
        elif key == "attention_mask":
            features[key] = mask
        elif key == "token_type_ids":
            features[key] = torch.zeros_like(ids)
        elif not isinstance(value, torch.Tensor):
            features[key] = value  # such as the modality of newer sentence-transformers
    return features


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; to CUDA through pinned memory, without waiting for the copy."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def batch_features(template: dict, ids: TokenIds, batch: np.ndarray, device: torch.device) -> dict:
    """The module's features of the texts at ``batch`` (positions into ``ids``), right-padded
    to the longest, on ``device``; ``template``: the module's features of any text (for the
    keys it expects)."""
    rows, _ = ids.padded(batch)
    # The mask is built on the device from the lengths: one small copy instead of a (B, L) one.
    lengths = _to_device(torch.from_numpy(ids.lengths[batch]), device)
    mask = (torch.arange(rows.shape[1], device=device) < lengths[:, None]).long()
    return _features_for(template, _to_device(torch.from_numpy(rows), device), mask)


# Padded tokens a batch holds by default: large batches keep a GPU busy (on an H100,
# 131,072 tokens encoded passages 12% and long documents 14% faster than 65,536, and
# 262,144 no faster; benchmarks/results/encode-batch-tokens-h100.json); on a CPU, batches
# past a few thousand tokens ran slower (STS-B sentences on 2 cores: 2,048 tokens as fast as
# encode's 32 sentences, 65,536 tokens 15% slower).
GPU_BATCH_TOKENS = 131072
CPU_BATCH_TOKENS = 2048
# (tokenizer threads, block characters) by default. Where the tokenizer runs each call on all
# cores, four blocks of 500,000 characters at once. Where it runs each call on one core
# (TOKENIZERS_PARALLELISM off), the threads are the only parallelism, and more, smaller blocks
# keep more cores busy: on 16 cores eight of 250,000 took 5,000 passages in 0.37 s against
# 0.45 s and 200 articles in 0.23 s against 0.38 s; on 2 cores the two were level
# (docs/performance.md).
PARALLEL_TOKENIZER_BLOCKS = (4, 500_000)
SERIAL_TOKENIZER_BLOCKS = (8, 250_000)


def encode_texts(model, texts: str | Sequence[str], batch_tokens: int | None = None, max_batch_size: int = 1024,
                 normalize_embeddings: bool = False, convert_to_numpy: bool = True,
                 show_progress_bar: bool | None = None, block_texts: int = 4096, block_characters: int | None = None,
                 tokenizer_threads: int | None = None, tokenizer_processes: bool | None = None):
    """Embed ``texts`` with the SentenceTransformer ``model``: the same embeddings, in the same
    order, as ``model.encode(texts)``, as a float32 array (a tensor on the model's device with
    ``convert_to_numpy=False``; one row for a single string).

    ``batch_tokens``: padded tokens a batch holds at most (a text longer than that is a batch
    of its own; default GPU_BATCH_TOKENS on CUDA, CPU_BATCH_TOKENS elsewhere);
    ``max_batch_size``: texts a batch holds at most. Texts are cut at the model's
    ``max_seq_length`` tokens, as ``encode`` cuts them. ``block_texts``, ``block_characters``:
    texts and characters a background thread tokenizes at a time, at most (a text longer
    than ``block_characters`` is a block of its own): small blocks let the model start
    sooner, large ones keep the tokenizer's cores busy. ``tokenizer_threads``: blocks
    tokenized at once (one when the module's own tokenization stands in for the fast backend).
    The two default to PARALLEL_TOKENIZER_BLOCKS, or to SERIAL_TOKENIZER_BLOCKS where
    TOKENIZERS_PARALLELISM has the tokenizer run each call on one core.
    ``tokenizer_processes``: each of the ``tokenizer_threads`` hands its blocks to a worker
    process of its own (``tokenizer_processes.py``), the cores shared among them, so that the
    tokenizer's Python work does not hold up the main thread's; the workers start at the
    first such call and serve the model's later calls. Default (None): on where the model
    runs on CUDA, whose forward waits on the host's tokenization; off on a CPU, where the
    model's own arithmetic needs the cores (docs/performance.md)."""
    single = isinstance(texts, str)
    device = model.device
    if batch_tokens is None:
        batch_tokens = GPU_BATCH_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS
    default_threads, default_characters = (SERIAL_TOKENIZER_BLOCKS if tokenizer_runs_serially()
                                           else PARALLEL_TOKENIZER_BLOCKS)
    tokenizer_threads = default_threads if tokenizer_threads is None else tokenizer_threads
    block_characters = default_characters if block_characters is None else block_characters
    if tokenizer_processes is None:
        tokenizer_processes = device.type == "cuda"
    elif not isinstance(tokenizer_processes, bool):
        raise TypeError(f"tokenizer_processes must be True, False or None, got {tokenizer_processes!r}")
    texts = _check_arguments(texts, batch_tokens=batch_tokens, max_batch_size=max_batch_size,
                             block_texts=block_texts, block_characters=block_characters,
                             tokenizer_threads=tokenizer_threads)
    first_module(model)  # a text module, else a TypeError naming what it is
    dimension = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    out = torch.empty(len(texts), dimension, dtype=torch.float32, device=device)
    if not texts:
        return out.cpu().numpy() if convert_to_numpy else out
    chosen = select_tokenizer(model, texts)
    if not isinstance(chosen, FastTokenizer):
        # The module's own tokenizer sets its padding and truncation on each call: one at a time.
        tokenizer_threads = 1

        def tokenize(block: list[str]) -> TokenIds:
            return TokenIds.from_lists(chosen(block))
    elif tokenizer_processes:
        tokenize = tokenizer_processes_of(model, chosen, tokenizer_threads).token_ids
    else:
        tokenize = chosen.token_ids
    template = module_features(model, texts[:1])
    # By characters first, as encode orders them: a block then holds texts of similar length.
    characters = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    order = np.argsort(-characters, kind="stable")
    if show_progress_bar is None:
        show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
    progress = tqdm(total=len(texts), desc="encode", unit="text", disable=not show_progress_bar)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            blocks = _tokenized_blocks(texts, _block_positions(characters, order, block_texts, block_characters),
                                       tokenize, tokenizer_threads)
            for positions, ids, batch in _batches_across_blocks(blocks, batch_tokens, max_batch_size):
                embeddings = model(batch_features(template, ids, batch, device))["sentence_embedding"]
                out[_to_device(torch.from_numpy(positions[batch].astype(np.int64)), device)] = embeddings.float()
                progress.update(len(batch))
    finally:
        progress.close()
        model.train(was_training)
    if normalize_embeddings:
        out = torch.nn.functional.normalize(out, dim=-1)
    if single:
        out = out[0]
    return out.cpu().numpy() if convert_to_numpy else out
