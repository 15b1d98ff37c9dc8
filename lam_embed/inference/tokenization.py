"""Tokenization for corpus-scale encoding: a fast tokenizer's Rust backend set to truncate
without padding (with less work where the ids stay the same: texts far past the limit cut
first, ASCII texts through a lighter normaliser), and the token ids of a block of texts kept
end to end in one array (padded per batch without a loop over its texts)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def first_module(model):
    """The text module of a SentenceTransformer (its tokenizer and max_seq_length)."""
    module = model[0]
    if not hasattr(module, "tokenizer") or not hasattr(module, "max_seq_length"):
        raise TypeError(f"the model's first module must be a text Transformer module, got {type(module).__name__}")
    return module


# The values of TOKENIZERS_PARALLELISM, in any case, with which the tokenizers library runs
# each call on one core (its own reading of the variable; unset means on all cores).
SERIAL_PARALLELISM_VALUES = ("", "off", "false", "f", "no", "n", "0")


def tokenizer_runs_serially() -> bool:
    """Whether TOKENIZERS_PARALLELISM tells the tokenizers library to run each call on one core."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is not None and value.lower() in SERIAL_PARALLELISM_VALUES


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
    copy so that the module's own tokenizer is left as it was.

    A text far longer than ``max_length`` tokens can need is cut at a space before it is
    tokenized, where the tokenizer reads words one at a time (BERT's WordPiece with its
    normaliser and word splitter, as all-MiniLM-L6-v2 and LAM have): the ids of the start of
    a text are then those of the whole text's start, and a cut text that gives fewer than
    ``max_length`` ids (long runs of spaces, say) is tokenized whole again. The tokenizer's
    time grows with the text, not with the ids kept: 200 Wikipedia articles at 512 tokens
    took a third of the time (docs/performance.md). ASCII texts go through a copy of the
    backend with a lighter normaliser of the same output on them (``_ascii_backend``)."""

    # Characters kept of a text, per token of max_length: all-MiniLM-L6-v2's tokenizer reads
    # about 4.7 characters a token in Wikipedia articles.
    CUT_CHARACTERS_PER_TOKEN = 10

    def __init__(self, tokenizer, max_length: int):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_padding()
        # On the side the module's tokenizer cuts (transformers' truncation_side, "right" by default).
        self.backend.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))
        self.max_length = max_length
        self.cut_characters = max_length * self.CUT_CHARACTERS_PER_TOKEN if _reads_words_alone(self.backend) else None
        self.ascii_backend = _ascii_backend(self.backend)

    def state(self) -> tuple:
        """What ``from_state`` rebuilds this tokenizer from (in another process)."""
        ascii_json = None if self.ascii_backend is None else self.ascii_backend.to_str()
        return self.backend.to_str(), ascii_json, self.max_length, self.cut_characters

    @classmethod
    def from_state(cls, state: tuple) -> FastTokenizer:
        from tokenizers import Tokenizer

        backend_json, ascii_json, max_length, cut_characters = state
        tokenizer = cls.__new__(cls)
        tokenizer.backend = Tokenizer.from_str(backend_json)
        tokenizer.ascii_backend = None if ascii_json is None else Tokenizer.from_str(ascii_json)
        tokenizer.max_length, tokenizer.cut_characters = max_length, cut_characters
        return tokenizer

    def token_ids(self, texts: list[str]) -> TokenIds:
        return TokenIds.from_lists(self(texts))

    def __call__(self, texts: list[str]) -> list[list[int]]:
        n = self.cut_characters
        cut = texts if n is None else [_cut_at_space(text, n) for text in texts]
        ids = self._encode(cut)
        # Texts cut to fewer ids than the limit: tokenized whole again.
        whole = [] if cut is texts else [i for i, (text, part, row) in enumerate(zip(texts, cut, ids))
                                         if part is not text and len(row) < self.max_length]
        for i, row in zip(whole, self._encode([texts[i] for i in whole])):
            ids[i] = row
        return ids

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of ``texts``; the ASCII ones through ``ascii_backend`` where there is one."""
        if self.ascii_backend is None:
            return _ids(self.backend, texts)
        is_ascii = [text.isascii() for text in texts]
        ids = [None] * len(texts)
        for backend, wanted in ((self.ascii_backend, True), (self.backend, False)):
            rows = [i for i, flag in enumerate(is_ascii) if flag is wanted]
            for i, row in zip(rows, _ids(backend, [texts[i] for i in rows])):
                ids[i] = row
        return ids


def _ids(backend, texts: list[str]) -> list[list[int]]:
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=True)] if texts else []


def _ascii_backend(backend):
    """A copy of ``backend`` whose normaliser gives BERT's normaliser's output on ASCII texts
    with less work, or None when its normaliser is not BERT's: on ASCII, BERT's removes the
    control characters and lowercases (when set to); its accent stripping and Chinese
    character handling change nothing there. A fifth less tokenizer time on corpus sentences
    and passages (docs/performance.md)."""
    from tokenizers import Regex, Tokenizer, normalizers

    bert = backend.normalizer
    # The word splitter must drop every whitespace character, as BERT's normaliser turns tab,
    # newline and carriage return into spaces and this one leaves them.
    if not isinstance(bert, normalizers.BertNormalizer) or not _splits_at_whitespace(backend):
        return None
    steps = []
    if bert.clean_text:
        # The ASCII characters BERT's normaliser removes as control characters (tab, newline
        # and carriage return are whitespace to it, and to the word splitter).
        steps.append(normalizers.Replace(Regex("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]"), ""))
    if bert.lowercase:
        steps.append(normalizers.Lowercase())
    copy = Tokenizer.from_str(backend.to_str())
    copy.normalizer = normalizers.Sequence(steps)
    return copy


def _reads_words_alone(backend) -> bool:
    """Whether ``backend`` tokenizes each whitespace-separated word on its own, so that a text cut
    at a space gives the ids of the whole text's start: WordPiece after BERT's (or no)
    normaliser and a whitespace or BERT word splitter, truncating at the end."""
    from tokenizers import models, normalizers

    truncation = backend.truncation or {}
    return (isinstance(backend.model, models.WordPiece)
            and (backend.normalizer is None or isinstance(backend.normalizer, normalizers.BertNormalizer))
            and _splits_at_whitespace(backend) and truncation.get("direction", "right") == "right")


def _splits_at_whitespace(backend) -> bool:
    """Whether ``backend``'s word splitter splits at every whitespace character and drops it."""
    from tokenizers import pre_tokenizers

    return isinstance(backend.pre_tokenizer, (pre_tokenizers.BertPreTokenizer, pre_tokenizers.Whitespace,
                                              pre_tokenizers.WhitespaceSplit))


def _cut_at_space(text: str, characters: int) -> str:
    """``text`` itself when it has at most ``characters`` characters, else its start up to the
    last space within them (itself when there is none)."""
    if len(text) <= characters:
        return text
    end = text.rfind(" ", 0, characters)
    return text[:end] if end > 0 else text
