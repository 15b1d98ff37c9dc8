"""Documents of any length: encode a document piece by piece in memory that does not grow
with it, and update the embedding of a growing document by encoding only the new text.

LAM reads a document chunk by chunk and carries two d x d states per head and layer
(lam_embed/state.py). A document here is the token ids of its pieces, each tokenized on its
own, between [CLS] and [SEP], exactly as a one-pass ``SentenceTransformer.encode`` of those
ids would see them (without its truncation). Complete chunks are encoded once; the tokens of
the incomplete last chunk wait for more text and are read again with it. With outlier pooling,
token weights or a pooling gate (LAMConfig.outlier_pooling_temperature,
token_weights_min_tokens, pooling_gate_min_tokens) a token's weight depends on the whole
document, so the document keeps its tokens' last hidden rows (4 * hidden_size bytes a token)
instead of sums, and memory grows with it. The embedding is
the model's own pooling (mean over all tokens, then its Normalize module if it has one).
Ids wait until a segment's worth is pending or the embedding is read, so a document read in
small pieces costs one forward a segment, and an append followed by reading the embedding
one forward of the last chunk's ids, the new ones and [SEP].

    import lam_embed
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer("lam")
    vector = lam_embed.encode_document(model, open("book.txt").read())
    doc = lam_embed.start_document(model)
    doc.append("first message")
    doc.append("a reply")
    vector = doc.embedding             # reads only the new tokens and the last chunk's
    doc.save("doc.state")              # beside your index; DocumentState.load(path, model)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .modeling_lam import repeat_cap_weights
from .sentence_transformer import Normalize, Pooling, module_pooling_mode
from .state import LAMState

# Tokens a forward reads, by device: on a GPU a forward costs a fixed launch time, so larger
# segments are faster; on a CPU the time a token is flat from 1,024 to 4,096 tokens and peak
# memory grows with the segment (807 MiB at 1,024, 851 at 2,048, 1,125 at 8,192 on 32k tokens).
DEFAULT_SEGMENT_TOKENS = {"cuda": 8192, "cpu": 2048}
FORMAT = "lam-document-state/2"
FORMAT_SINGLE_SUM = "lam-document-state/1"  # before the per-id sums: one sum, no token repeat cap


class PooledRows:
    """The pooled part of a document whose pooling weights depend on all of its rows
    (LAMConfig.outlier_pooling_temperature: each row against the document's mean; or
    token_weights_min_tokens, pooling_gate_min_tokens: the weights' share depends on the
    final length): the ids and final hidden rows (float32) themselves, weighted as the
    model's one pass weighs them when the embedding is read. Memory grows with the document:
    4 * hidden_size bytes a token."""

    def __init__(self, lam):
        self.lam = lam
        self.ids = torch.zeros(0, dtype=torch.long, device=lam.device)
        self.rows = torch.zeros(0, lam.config.hidden_size, dtype=torch.float32, device=lam.device)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def add(self, ids: torch.Tensor, hidden: torch.Tensor) -> PooledRows:
        out = PooledRows(self.lam)
        out.ids = torch.cat([self.ids, ids.to(self.ids.device)])
        out.rows = torch.cat([self.rows, hidden.to(self.rows)])
        return out

    def mean(self) -> torch.Tensor:
        weighted = self.lam.weight_rows_for_pooling(self.rows[None], self.ids[None], torch.ones_like(self.ids)[None])
        return weighted[0].double().mean(0)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"pooled_ids": self.ids.cpu(), "pooled_rows": self.rows.cpu()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], lam) -> PooledRows:
        pooled = cls(lam)
        pooled.ids = tensors["pooled_ids"].to(device=lam.device, dtype=torch.long)
        pooled.rows = tensors["pooled_rows"].to(device=lam.device, dtype=torch.float32)
        if pooled.rows.shape != (len(pooled.ids), lam.config.hidden_size):
            raise ValueError("pooled rows and ids differ in length")
        return pooled


def keeps_rows(config) -> bool:
    """Whether a streamed document must keep its rows (PooledRows) rather than sums."""
    return (config.outlier_pooling_temperature is not None or config.token_weights_min_tokens is not None
            or config.pooling_gate_min_tokens is not None)


class PooledSums:
    """The pooled part of a document: float64 sums of final hidden states and their counts,
    by token id where the model caps repeated tokens (LAMConfig.token_repeat_cap: the
    weight of an id depends on its count in the whole document, known only at the end),
    else in one bucket (id 0)."""

    def __init__(self, hidden_size: int, device, cap: int | None):
        self.cap = cap
        self.ids = torch.zeros(0, dtype=torch.long, device=device)
        self.sums = torch.zeros(0, hidden_size, dtype=torch.float64, device=device)
        self.counts = torch.zeros(0, dtype=torch.float64, device=device)

    @property
    def tokens(self) -> int:
        return int(self.counts.sum().item())

    def add(self, ids: torch.Tensor, hidden: torch.Tensor) -> PooledSums:
        """A new PooledSums with the rows ``hidden`` (T, D) of the token ids ``ids`` (T,) added."""
        out = PooledSums(self.sums.shape[1], self.sums.device, self.cap)
        buckets = ids.to(self.ids.device) if self.cap is not None else torch.zeros_like(ids, device=self.ids.device)
        out.ids, inverse = torch.unique(torch.cat([self.ids, buckets]), return_inverse=True)
        out.sums = torch.zeros(len(out.ids), self.sums.shape[1], dtype=torch.float64, device=self.sums.device)
        out.sums.index_add_(0, inverse, torch.cat([self.sums, hidden.to(self.sums)]))
        out.counts = torch.zeros(len(out.ids), dtype=torch.float64, device=self.sums.device)
        out.counts.index_add_(0, inverse, torch.cat([self.counts, torch.ones(len(buckets)).to(self.counts)]))
        return out

    def mean(self) -> torch.Tensor:
        """The pooled vector (D,): the mean, each id weighted as the model's one pass weighs it."""
        weights = repeat_cap_weights(self.counts, self.cap) if self.cap is not None else torch.ones_like(self.counts)
        return (weights[:, None] * self.sums).sum(0) / (weights * self.counts).sum()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"pooled_ids": self.ids.cpu(), "pooled_sums": self.sums.cpu(), "pooled_counts": self.counts.cpu()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], device, cap: int | None) -> PooledSums:
        pooled = cls(tensors["pooled_sums"].shape[1], device, cap)
        pooled.ids = tensors["pooled_ids"].to(device=device, dtype=torch.long)
        pooled.sums = tensors["pooled_sums"].to(device=device, dtype=torch.float64)
        pooled.counts = tensors["pooled_counts"].to(device=device, dtype=torch.float64)
        if pooled.sums.shape[0] != len(pooled.ids) or pooled.counts.shape != pooled.ids.shape:
            raise ValueError("pooled sums, ids and counts differ in length")
        return pooled


def _parts(model):
    """The LAM model, tokenizer and whether the embedding is normalised, or a ValueError
    saying why ``model`` cannot be streamed."""
    modules = list(model)
    lam = getattr(modules[0], "auto_model", None) if modules else None
    if getattr(getattr(lam, "config", None), "model_type", None) != "lam":
        raise ValueError("model must be a LAM SentenceTransformer (import lam_embed; SentenceTransformer(folder))")
    pooling = [m for m in modules[1:] if isinstance(m, Pooling)]
    if len(pooling) != 1 or module_pooling_mode(pooling[0]) != "mean":
        raise ValueError("streaming computes mean pooling; this model's pooling is "
                         f"{[module_pooling_mode(p) for p in pooling] or 'missing'}")
    others = [m for m in modules[1:] if not isinstance(m, Pooling | Normalize)]
    if others:
        raise ValueError(f"streaming knows Pooling and Normalize only; this model also has {type(others[0]).__name__}")
    return lam, model.tokenizer, any(isinstance(m, Normalize) for m in modules)


def model_fingerprint(lam) -> str:
    """A hash of the model's config and weights: a saved state is only valid for them."""
    digest = hashlib.sha256(json.dumps(lam.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(lam.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of the tensors' names and bytes and of the metadata: a flipped byte anywhere is an error on load."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _piece_ids(tokenizer, piece) -> list[int]:
    if not isinstance(piece, str):
        raise TypeError(f"a document piece must be a str, got {type(piece).__name__}")
    if not piece.strip():
        raise ValueError("a document piece is empty (or only whitespace)")
    return tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]


def _new_pooled(lam) -> PooledSums | PooledRows:
    if keeps_rows(lam.config):
        return PooledRows(lam)
    return PooledSums(lam.config.hidden_size, lam.device, lam.config.token_repeat_cap)


def _advance(lam, state: LAMState | None, pending: list[list[int]], pooled: list[PooledSums | PooledRows], segment_tokens: int):
    """Encode ``segment_tokens`` (a multiple of the chunk size) of every document that has
    more pending ids than that, until none has. Returns the new state, the pending ids
    left (at most ``segment_tokens`` each) and ``pooled`` with the encoded tokens added."""
    while any(len(ids) > segment_tokens for ids in pending):
        takes = [segment_tokens if len(ids) > segment_tokens else 0 for ids in pending]
        ids, mask = _batch([p[:t] for p, t in zip(pending, takes)], lam.device, lam.config.chunk_size)
        out = lam(input_ids=ids, attention_mask=mask, past_state=state, use_cache=True)
        pooled = [p.add(ids[row, :t], out.last_hidden_state[row, :t].double()) if t else p
                  for row, (p, t) in enumerate(zip(pooled, takes))]
        pending = [p[t:] for p, t in zip(pending, takes)]
        state = out.state
    return state, pending, pooled


def _batch(sequences: Sequence[list[int]], device, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (LAM reads tokens in order), padded to a multiple of the
    chunk size: the forwards of a stream then see few shapes, and on a GPU a new shape
    costs more than the padding (kernel selection for each matrix product)."""
    longest = max(1, max(len(s) for s in sequences))
    longest = -(-longest // chunk_size) * chunk_size
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _finish(lam, state, pending, pooled: list[PooledSums | PooledRows], sep: int, normalize: bool):
    """The embeddings, from one forward over each document's pending ids and [SEP]; the same
    forward carries the state past the complete chunks of the pending ids (not [SEP]).
    Returns (embeddings (B, D) float32, state, pending ids left, pooled) for them, ``pooled``
    with the tokens carried into the state added. A model with long-input layers reads a
    document of at most long_input_min_tokens tokens, [SEP] included, in a plain forward
    through its first layers, as ``encode`` does, and carries nothing for it."""
    chunk = lam.config.chunk_size
    limit = lam.config.long_input_min_tokens
    short = [limit is not None and p.tokens == 0 and len(ids) + 1 <= limit for p, ids in zip(pooled, pending)]
    means = [None] * len(pending)
    if any(short):
        rows = [row for row, is_short in enumerate(short) if is_short]
        ids, mask = _batch([pending[row] + [sep] for row in rows], lam.device, chunk)
        hidden = lam(input_ids=ids, attention_mask=mask).last_hidden_state.double()  # pooling weights applied
        for i, row in enumerate(rows):
            means[row] = hidden[i, : len(pending[row]) + 1].mean(0)
    takes = [0 if is_short else len(p) // chunk * chunk for p, is_short in zip(pending, short)]
    carried = list(pooled)
    if not all(short):
        # A short document was read above: here it is a placeholder that carries nothing.
        ids, mask = _batch([[sep] if is_short else p + [sep] for p, is_short in zip(pending, short)], lam.device, chunk)
        lengths = torch.tensor([0 if is_short else len(p) for p, is_short in zip(pending, short)])
        out = lam(input_ids=ids, attention_mask=mask, past_state=state, state_after_tokens=lengths.to(lam.device))
        hidden = out.last_hidden_state.double()
        state = out.state
        for row, (p, t) in enumerate(zip(pooled, takes)):
            if short[row]:
                continue
            valid = len(pending[row]) + 1
            carried[row] = p.add(ids[row, :t], hidden[row, :t]) if t else p
            means[row] = carried[row].add(ids[row, t:valid], hidden[row, t:valid]).mean()
    mean = torch.stack(means)
    if normalize:
        mean = torch.nn.functional.normalize(mean, dim=-1)
    return mean.float().cpu().numpy(), state, [p[t:] for p, t in zip(pending, takes)], carried


def _check_segment(segment_tokens: int | None, lam) -> int:
    """``segment_tokens`` rounded down to whole chunks; None: the default of lam's device.
    With long-input layers a segment must be longer than long_input_min_tokens, so that a
    document is carried (through the long-input layers) only once it is a long input."""
    chunk_size = lam.config.chunk_size
    if segment_tokens is None:
        segment_tokens = DEFAULT_SEGMENT_TOKENS.get(lam.device.type, DEFAULT_SEGMENT_TOKENS["cpu"])
    if not isinstance(segment_tokens, int) or segment_tokens < chunk_size:
        raise ValueError(f"segment_tokens must be an integer of at least the chunk size {chunk_size}, "
                         f"got {segment_tokens!r}")
    segment_tokens = segment_tokens // chunk_size * chunk_size
    limit = lam.config.long_input_min_tokens
    if limit is not None and segment_tokens <= limit:
        raise ValueError(f"segment_tokens must exceed the model's long_input_min_tokens ({limit}) once rounded down "
                         f"to whole chunks of {chunk_size}, got {segment_tokens}")
    return segment_tokens


class DocumentState:
    """A document encoded so far: the carried state, the ids not yet encoded into it (at most
    a segment; after reading the embedding, those of the incomplete last chunk) and the
    pooled sums (PooledSums) or rows (PooledRows) of the rest. ``append`` adds text, ``embedding`` is the document's vector,
    ``save`` / ``load`` keep it beside an index. Build one with ``start_document``."""

    def __init__(self, model, segment_tokens: int | None = None):
        self.model = model
        self.lam, self.tokenizer, self.normalize = _parts(model)
        self.segment_tokens = _check_segment(segment_tokens, self.lam)
        self.state: LAMState | None = None
        self.pending: list[int] = [self.tokenizer.cls_token_id]
        self.pooled = _new_pooled(self.lam)
        self._embedding = None

    @property
    def tokens(self) -> int:
        """Tokens of the document so far, [CLS] included ([SEP] is added by ``embedding``)."""
        return self.pooled.tokens + len(self.pending)

    @torch.inference_mode()
    def append(self, piece: str) -> DocumentState:
        """Add a piece of text (tokenized on its own). Its ids wait until more than
        ``segment_tokens`` are pending (or the embedding is read), then whole segments are
        encoded: a document read in small pieces costs one forward a segment."""
        self.pending = self.pending + _piece_ids(self.tokenizer, piece)
        if len(self.pending) > self.segment_tokens:
            self.state, (self.pending,), (self.pooled,) = _advance(
                self.lam, self.state, [self.pending], [self.pooled], self.segment_tokens)
        self._embedding = None
        return self

    @property
    def embedding(self) -> np.ndarray:
        """The document's embedding (float32), as the model's pooling gives it. Reading it
        encodes the pending ids with [SEP] in one forward, which also carries the state
        past their complete chunks."""
        if self._embedding is None:
            with torch.inference_mode():
                embeddings, self.state, (self.pending,), (self.pooled,) = _finish(
                    self.lam, self.state, [self.pending], [self.pooled], self.tokenizer.sep_token_id, self.normalize)
            self._embedding = embeddings[0]
        return self._embedding

    def save(self, path: str | Path) -> None:
        """Write the state to ``path`` (safetensors; the model is not saved, only its fingerprint)."""
        tensors = {} if self.state is None else {k: v.contiguous().cpu() for k, v in self.state.to_dict().items()}
        tensors.update(self.pooled.to_tensors())
        metadata = {"format": FORMAT, "model": model_fingerprint(self.lam), "pending": json.dumps(self.pending),
                    "segment_tokens": str(self.segment_tokens)}
        metadata["checksum"] = _checksum(tensors, metadata)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, model) -> DocumentState:
        """A state written by ``save`` for this model; ValueError for another model or a damaged file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # a truncated or foreign file: safetensors raises several kinds
            raise ValueError(f"{path} is not a saved LAM document state ({type(err).__name__}: {err})") from None
        if metadata.get("format") not in (FORMAT, FORMAT_SINGLE_SUM):
            raise ValueError(f"{path} is not a saved LAM document state (format {metadata.get('format')!r})")
        checksum = metadata.pop("checksum", None)
        if checksum != _checksum(tensors, metadata):
            raise ValueError(f"{path}: damaged LAM document state (checksum mismatch)")
        document = cls(model, int(metadata["segment_tokens"]))
        if metadata["model"] != model_fingerprint(document.lam):
            raise ValueError(f"{path} was saved with another model or config; its state does not apply to this one")
        try:
            document.pending = [int(i) for i in json.loads(metadata["pending"])]
            if metadata["format"] == FORMAT_SINGLE_SUM:  # one sum: the pooled sums' single bucket
                if document.lam.config.token_repeat_cap is not None:
                    raise ValueError("it holds one sum, not the per-id sums a token repeat cap needs")
                tensors["pooled_ids"] = torch.zeros(1, dtype=torch.long)
                tensors["pooled_sums"] = tensors.pop("sum")[None]
                tensors["pooled_counts"] = torch.tensor([float(metadata["count"])])
            if keeps_rows(document.lam.config):
                document.pooled = PooledRows.from_tensors(
                    {k: tensors.pop(k) for k in ("pooled_ids", "pooled_rows")}, document.lam)
            else:
                document.pooled = PooledSums.from_tensors(
                    {k: tensors.pop(k) for k in ("pooled_ids", "pooled_sums", "pooled_counts")},
                    document.lam.device, document.lam.config.token_repeat_cap)
            if tensors:
                document.state = LAMState.from_dict({k: v.to(document.lam.device) for k, v in tensors.items()})
                document.state.check(document.lam.config, 1, document.lam.device)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: damaged LAM document state ({err})") from None
        return document


def start_document(model, segment_tokens: int | None = None) -> DocumentState:
    """An empty document for ``model`` (a LAM SentenceTransformer); see DocumentState."""
    return DocumentState(model, segment_tokens)


def append(document: DocumentState, piece: str) -> DocumentState:
    """``document.append(piece)``."""
    return document.append(piece)


def encode_document(model, text_or_pieces: str | Iterable[str], segment_tokens: int | None = None,
                    show_progress_bar: bool = False) -> np.ndarray:
    """The embedding of one document of any length, a text or an iterable of pieces."""
    pieces = [text_or_pieces] if isinstance(text_or_pieces, str) else text_or_pieces
    document = start_document(model, segment_tokens)
    for piece in tqdm(pieces, desc="pieces", unit="piece", disable=not show_progress_bar):
        document.append(piece)
    return document.embedding


@torch.inference_mode()
def encode_documents(model, documents: Sequence[str | Sequence[str]], batch_size: int = 8,
                     segment_tokens: int | None = None, show_progress_bar: bool = False) -> np.ndarray:
    """Embeddings (N, D) float32 of many documents of any length, ``batch_size`` at a time,
    each read ``segment_tokens`` tokens at a time (texts, or sequences of pieces)."""
    lam, tokenizer, normalize = _parts(model)
    segment_tokens = _check_segment(segment_tokens, lam)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids = []
    for number, document in enumerate(documents):
        pieces = [document] if isinstance(document, str) else list(document)
        try:
            ids.append([tokenizer.cls_token_id] + [i for piece in pieces for i in _piece_ids(tokenizer, piece)])
        except (TypeError, ValueError) as err:
            raise type(err)(f"document {number}: {err}") from None
    out = np.zeros((len(ids), lam.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(ids), batch_size), desc="documents", unit="batch", disable=not show_progress_bar):
        batch = ids[start:start + batch_size]
        state, pending, pooled = _advance(lam, None, batch, [_new_pooled(lam) for _ in batch], segment_tokens)
        out[start:start + len(batch)] = _finish(lam, state, pending, pooled, tokenizer.sep_token_id, normalize)[0]
    return out
