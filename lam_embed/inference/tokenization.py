"""Tokenization for corpus-scale encoding: a fast tokenizer's Rust backend set to truncate
without padding, token ids kept end to end in one array per block of texts, and a pool of
processes that tokenize beside the process that runs the model.

Why processes: a tokenizer call holds the interpreter lock while it reads its texts and
builds its id lists, and so does the model's forward while it launches its kernels; in
one process each waits on the other. A worker process has its own interpreter, and what it
sends back (two integer arrays a block) costs little to receive.
"""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np


def first_module(model):
    """The text module of a SentenceTransformer (its tokenizer and max_seq_length)."""
    module = model[0]
    if not hasattr(module, "tokenizer") or not hasattr(module, "max_seq_length"):
        raise TypeError(f"the model's first module must be a text Transformer module, got {type(module).__name__}")
    return module


@dataclass(frozen=True)
class TokenIds:
    """The token ids of several texts end to end in ``flat``; text i holds
    ``flat[starts[i]:starts[i] + lengths[i]]``."""

    flat: np.ndarray
    lengths: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        starts = np.zeros(len(self.lengths), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=starts[1:])
        return starts

    @classmethod
    def from_lists(cls, ids: list[list[int]]) -> TokenIds:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return cls(flat, lengths)

    def padded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of the texts at ``rows``, right-padded with 0 to the longest."""
        lengths = self.lengths[rows]
        columns = np.arange(int(lengths.max()) if len(rows) else 0)
        mask = columns[None, :] < lengths[:, None]
        ids = np.zeros(mask.shape, dtype=np.int64)
        ids[mask] = self.flat[(self.starts[rows][:, None] + columns[None, :])[mask]]
        return ids, mask

    def select(self, rows: np.ndarray) -> TokenIds:
        """The texts at ``rows``, in that order."""
        ids, mask = self.padded(rows)
        return TokenIds(ids[mask], self.lengths[rows])

    @staticmethod
    def concatenate(first: TokenIds, second: TokenIds) -> TokenIds:
        return TokenIds(np.concatenate([first.flat, second.flat]), np.concatenate([first.lengths, second.lengths]))


def truncating_backend(tokenizer_json: str, max_length: int):
    """A ``tokenizers.Tokenizer`` from its JSON, truncating at ``max_length`` without padding."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_padding()
    backend.enable_truncation(max_length)
    return backend


def backend_ids(backend, texts: list[str]) -> TokenIds:
    return TokenIds.from_lists([encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=True)])


class FastTokenizer:
    """The backend of a fast tokenizer, set to truncate at ``max_length`` with no padding, on a
    copy so that the module's own tokenizer is left as it was."""

    def __init__(self, tokenizer, max_length: int):
        self.max_length = max_length
        self.backend = truncating_backend(tokenizer.backend_tokenizer.to_str(), max_length)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=True)]


# In a worker process: the tokenizer's JSON, and a backend per length limit.
_worker_tokenizer_json: str | None = None
_worker_backends: dict = {}


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer_json
    _worker_tokenizer_json = tokenizer_json
    _worker_backends.clear()


def _worker_ready() -> None:
    pass


def _tokenize_in_worker(texts: list[str], max_length: int) -> TokenIds:
    if max_length not in _worker_backends:
        _worker_backends[max_length] = truncating_backend(_worker_tokenizer_json, max_length)
    return backend_ids(_worker_backends[max_length], texts)


class TokenizerPool:
    """Processes that tokenize texts for ``encode_texts`` with a model's fast tokenizer::

        with lam_embed.TokenizerPool(model, processes=8) as pool:
            embeddings = lam_embed.encode_texts(model, texts, tokenizer_pool=pool)

    The processes start with multiprocessing's "spawn" method (safe beside CUDA): each
    imports the main module as spawn does, so a start takes seconds and a pool is worth
    keeping for many calls. A script that starts one must guard its own work with
    ``if __name__ == "__main__":``. A pool serves the tokenizer it was started with
    (``encode_texts`` checks); ``close()`` (or the end of the ``with`` block) stops the
    processes."""

    def __init__(self, model, processes: int = 4):
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive integer, got {processes!r}")
        tokenizer = first_module(model).tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"TokenizerPool needs a fast tokenizer (one with a Rust backend), got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.processes = processes
        self.closed = False
        self._executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker,
                                             initargs=(tokenizer.backend_tokenizer.to_str(),))
        # The executor starts a process per task while none is idle: one task each starts them
        # all now, and they come up while the caller goes on.
        for _ in range(processes):
            self._executor.submit(_worker_ready)

    def submit(self, texts: list[str], max_length: int) -> Future:
        """A future of the ``TokenIds`` of ``texts``, truncated at ``max_length``."""
        return self._executor.submit(_tokenize_in_worker, texts, max_length)

    def close(self) -> None:
        self.closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
