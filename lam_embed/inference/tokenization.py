"""Tokenization for corpus-scale encoding: a fast tokenizer's Rust backend set to truncate
without padding, and the token ids of a block of texts kept end to end in one array (padded
per batch without a loop over its texts)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

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

    @cached_property  # one cumulative sum a block, read by each of its batches
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


class FastTokenizer:
    """The backend of a fast tokenizer, set to truncate at ``max_length`` with no padding, on a
    copy so that the module's own tokenizer is left as it was."""

    def __init__(self, tokenizer, max_length: int):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_padding()
        self.backend.enable_truncation(max_length)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=True)]
