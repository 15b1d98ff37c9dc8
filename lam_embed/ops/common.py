"""Pieces shared by every implementation of the dual-state delta rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Guards the division of a state by its Frobenius norm (docs/SPEC.md: epsilon = 1e-8).
EPS = 1e-8
# Guards the division of a query or key by its norm (F.normalize's eps in the layer).
QK_NORM_EPS = 1e-6
# The coupling strength psi of the resonance flux is clamped to [PSI_MIN, PSI_MAX]
# (docs/SPEC.md): neither memory is ever fully replaced by the other.
PSI_MIN, PSI_MAX = 0.01, 0.99


# The layer's input projection (DualStateDeltaNet.input_projection) computes these
# outputs in one product, in this order: hidden_size columns for each vector, then
# num_heads columns (one per head) for each scalar, of which the decays have a bias.
# The fused kernels (triton/layer.py) read the projection by this layout.
PROJECTION_VECTORS = ("q", "k", "v", "output_gate")
PROJECTION_SCALARS = ("beta", "decay_fast", "decay_slow", "gate_fast", "gate_slow")


def projection_columns(hidden_size: int, num_heads: int) -> dict[str, slice]:
    """The columns of each output in the stacked input projection, by name."""
    columns, start = {}, 0
    for names, width in ((PROJECTION_VECTORS, hidden_size), (PROJECTION_SCALARS, num_heads)):
        for name in names:
            columns[name] = slice(start, start + width)
            start += width
    return columns


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, QK_NORM_EPS) over the last dim, in float32."""
    return F.normalize(x.float(), dim=-1, eps=QK_NORM_EPS)


def pad_to_chunks(chunk_size: int, *tensors: torch.Tensor, mask: torch.Tensor):
    """Zero-pad the position axis (dim 2 of each tensor, dim 1 of mask) to a multiple of chunk_size."""
    pad = -mask.shape[1] % chunk_size
    if pad == 0:
        return (*tensors, mask)
    padded = []
    for t in tensors:
        widths = [0, 0] * (t.dim() - 3) + [0, pad]  # F.pad counts from the last dim backwards
        padded.append(F.pad(t, widths))
    return (*padded, F.pad(mask, (0, pad), value=False))


def psi_decay_factors(psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors by which psi scales the chunk's mean fast and slow decays (docs/SPEC.md):
    a stronger coupling forgets faster, the fast memory twice as much."""
    return 1 - 0.10 * psi, 1 - 0.05 * psi


def fast_share(psi: torch.Tensor) -> torch.Tensor:
    """alpha: the share of the fast memory in a chunk's output, 0.5 + 0.3 psi (docs/SPEC.md)."""
    return 0.5 + 0.3 * psi


def coupling_and_normalise(S_fast: torch.Tensor, S_slow: torch.Tensor, psi: torch.Tensor):
    """Resonance coupling of the two states after a chunk, then both normalised.

    S_fast, S_slow: (..., d, d); psi: (...). The slow update reads the new fast state.
    """
    c = (0.05 + 0.1 * psi)[..., None, None]
    p = psi[..., None, None]
    S_fast = S_fast + c * p * S_slow
    S_slow = S_slow + c * (1 - p) * S_fast
    S_fast = S_fast / (torch.linalg.matrix_norm(S_fast)[..., None, None] + EPS)
    S_slow = S_slow / (torch.linalg.matrix_norm(S_slow)[..., None, None] + EPS)
    return S_fast, S_slow
