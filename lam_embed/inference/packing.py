"""Packed batches: the valid tokens of a right-padded batch one sample after another, with
no padding between them (LAMConfig.packed_inference).

sentence-transformers pads each batch to its longest text; on short texts of mixed
lengths a fifth of the rows can be padding, which every matrix product of a padded forward
computes and throws away. A packed forward runs the row-wise work (embeddings, projections,
FFNs, LayerNorms) on the valid rows only; the token mixer reads each sample's rows from its
start (the convolution never reaches into the sample before, the delta rule runs per
sample), so every valid token gets what the padded forward gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    """index: (N,) the valid tokens' places in the flattened (B * L) batch, in order;
    starts, lengths: (B,) each sample's first row and row count in the packed rows;
    positions: (N,) each row's position in its sample; batch_shape: (B, L)."""

    index: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    batch_shape: tuple[int, int]

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> PackedBatch | None:
        """The packing of a (B, L) bool mask whose every row is valid tokens then padding;
        None when some row has a gap or padding first (such a batch keeps its padding:
        positions and the convolution see the gaps) or when there is no padding to drop."""
        B, L = mask.shape
        lengths = mask.sum(1)
        if int(lengths.sum()) == B * L:
            return None
        columns = torch.arange(L, device=mask.device)
        if not bool(torch.equal(mask, columns < lengths[:, None])):
            return None
        index = mask.reshape(-1).nonzero().squeeze(1)
        starts = torch.cumsum(lengths, 0) - lengths
        return cls(index, starts, lengths, index % L, (B, L))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (N, ...): the valid rows of ``t``."""
        return t.flatten(0, 1).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, L, ...): the rows at their places, zero on padding."""
        out = rows.new_zeros(self.batch_shape[0] * self.batch_shape[1], *rows.shape[1:])
        return out.index_copy_(0, self.index, rows).unflatten(0, self.batch_shape)
