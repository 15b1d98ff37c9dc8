"""Chunked form of the dual-state delta rule (docs/SPEC.md section 2).

Everything that depends on one chunk alone is computed for all chunks at once:
the exact inverse T = (I + strictly_lower(Kb K^T))^-1 by a unit-triangular solve,
U = T Vb, W = T Kb, the causal scores A, psi and the mean decays. Because
Q R + A (U - W R) = (Q - A W) R + A U and K^T (U - W R) = K^T U - (K^T W) R, the
only sequential part is a loop over chunks on d x d matrices (the two states);
the output rows are then formed for all chunks in one batched product. An input
of one chunk starts from zero states and skips the loop.

Shapes as in naive.py: q, k, v (B, H, L, d); beta, decays, gates (B, H, L); mask (B, L).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from .common import EPS, coupling_and_normalise, fast_share, pad_to_chunks, psi_decay_factors


def intra_chunk(q, k, v, beta, mask, chunk_size: int, with_w: bool | None = None):
    """Per-chunk quantities, for all chunks in parallel.

    Returns Q, K (B, H, N, C, d), UW = [U | W] (B, H, N, C, 2d), A (B, H, N, C, C),
    valid (B, N, C). Without ``with_w`` (by default: for a single chunk) UW is U alone
    (B, H, N, C, d): only the states read W, and they are zero in the first chunk.
    """
    to_chunks = lambda t: rearrange(t, "b h (n c) ... -> b h n c ...", c=chunk_size)
    # Contiguous copies (the layer passes views of (B, L, H, d) tensors): every product
    # below would otherwise copy its operands itself, K three times.
    Q, K, V = (to_chunks(t).contiguous() for t in (q, k, v))
    b = to_chunks(beta)
    valid = rearrange(mask, "b (n c) -> b n c", c=chunk_size)
    b = b * valid[:, None]
    Kb, Vb = K * b[..., None], V * b[..., None]
    if with_w is None:
        with_w = Q.shape[2] > 1
    # One solve for both right-hand sides: (I + strictly_lower(Kb K^T)) [U W] = [Vb Kb].
    rhs = torch.cat([Vb, Kb], -1) if with_w else Vb
    # A unit lower-triangular solve reads only the strictly lower triangle of its matrix
    # (and its gradient is zero elsewhere), so the product is passed as it is: no tril, no I.
    UW = torch.linalg.solve_triangular(Kb @ K.transpose(-1, -2), rhs, upper=False, unitriangular=True)
    # In place: the product is a fresh tensor, and matmul's backward does not read it.
    A = (Q @ K.transpose(-1, -2)).tril_()
    return Q, K, UW, A, valid


def state_step(S_fast, S_slow, KtU, KtW, decay_fast, decay_slow, psi, keep, state_dropout: float, training: bool):
    """Advance both states over one chunk; return the new states and the normalised
    states R the chunk reads. States (B, H, d, d); KtU, KtW (B, H, d, d); decays, psi (B, H); keep (B,)."""
    S_fast_decayed = S_fast * decay_fast[..., None, None]
    S_slow_decayed = S_slow * decay_slow[..., None, None]
    R_fast = S_fast_decayed / (torch.linalg.matrix_norm(S_fast_decayed)[..., None, None] + EPS)
    R_slow = S_slow_decayed / (torch.linalg.matrix_norm(S_slow_decayed)[..., None, None] + EPS)
    new_fast = S_fast_decayed + F.dropout(KtU - KtW @ R_fast, state_dropout, training)
    new_slow = S_slow_decayed + F.dropout(KtU - KtW @ R_slow, state_dropout, training)
    new_fast, new_slow = coupling_and_normalise(new_fast, new_slow, psi)
    keep = keep[:, None, None, None]
    return torch.where(keep, new_fast, S_fast), torch.where(keep, new_slow, S_slow), R_fast, R_slow


def chunk_dual_state_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_fast: torch.Tensor,
    decay_slow: torch.Tensor,
    gate_fast: torch.Tensor,
    gate_slow: torch.Tensor,
    mask: torch.Tensor,
    flux: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int = 128,
    state_dropout: float = 0.0,
    training: bool = False,
    intra_fn: Callable = intra_chunk,
    step_fn: Callable = state_step,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    state_after_chunks: torch.Tensor | None = None,
):
    """Dual-state delta rule in chunked form; same contract as ``naive_dual_state_delta_rule``
    (``initial_state`` and ``state_after_chunks`` included).

    ``intra_fn`` and ``step_fn`` let the compiled implementation pass compiled
    versions of the two hot functions.
    """
    B, H, L, d = q.shape
    q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask = pad_to_chunks(
        chunk_size, q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask=mask
    )
    carried = initial_state is not None or state_after_chunks is not None
    Q, K, UW, A, valid = intra_fn(q, k, v, beta, mask, chunk_size, with_w=True if carried else None)
    psi = flux(K, UW[..., :d], valid)  # (B, H, N)
    to_chunks = lambda t: rearrange(t, "b h (n c) -> b h n c", c=chunk_size)
    gate_fast, gate_slow = to_chunks(gate_fast)[..., None], to_chunks(gate_slow)[..., None]
    alpha = fast_share(psi)[..., None, None]
    # Products with U and W share their left factor: one product each for [U | W].
    AUW = A @ UW  # [A U | A W]
    AU = AUW[..., :d]
    N = Q.shape[2]
    if N == 1 and not carried:
        # Zero states: R = 0 and each state's output is A U.
        O = (alpha * gate_fast + (1 - alpha) * gate_slow) * AU
        return rearrange(O, "b h n c d -> b h (n c) d")[:, :, :L]

    count = valid.sum(-1).clamp(min=1)[:, None]  # (B, 1, N)
    factor_fast, factor_slow = psi_decay_factors(psi)
    decay_fast = (to_chunks(decay_fast) * valid[:, None]).sum(-1) / count * factor_fast
    decay_slow = (to_chunks(decay_slow) * valid[:, None]).sum(-1) / count * factor_slow
    KtU, KtW = (K.transpose(-1, -2) @ UW).split(d, dim=-1)
    keep = valid.any(-1)  # (B, N)

    if initial_state is None:
        S_fast = S_slow = q.new_zeros(B, H, d, d)
    else:
        S_fast, S_slow = initial_state
    saved = (S_fast, S_slow)
    R_fast, R_slow = [], []
    for n in range(N):
        S_fast, S_slow, r_fast, r_slow = step_fn(
            S_fast, S_slow, KtU[:, :, n], KtW[:, :, n], decay_fast[:, :, n], decay_slow[:, :, n],
            psi[:, :, n], keep[:, n], state_dropout, training,
        )
        R_fast.append(r_fast)
        R_slow.append(r_slow)
        if state_after_chunks is not None:
            here = (state_after_chunks == n + 1)[:, None, None, None]
            saved = (torch.where(here, S_fast, saved[0]), torch.where(here, S_slow, saved[1]))
    QW = Q - AUW[..., d:]
    QWR = QW @ torch.cat([torch.stack(R_fast, 2), torch.stack(R_slow, 2)], -1)  # [QW R_fast | QW R_slow]
    O_fast = gate_fast * (QWR[..., :d] + AU)
    O_slow = gate_slow * (QWR[..., d:] + AU)
    O = alpha * O_fast + (1 - alpha) * O_slow
    out = rearrange(O, "b h n c d -> b h (n c) d")[:, :, :L]
    return out if state_after_chunks is None else (out, saved)
