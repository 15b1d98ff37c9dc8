"""Token-level reference of the dual-state delta rule (docs/SPEC.md section 2).

Readable and slow: a loop over chunks and, inside each chunk, over tokens. It is
the oracle the chunked and fused implementations are tested against, so it
computes every quantity the direct way (no triangular solve, no precomputed
products).

Shapes: q, k, v are (B, H, L, d) with q and k normalised per head; beta, the
decays and the gates are (B, H, L); mask is (B, L) bool, True on valid tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .common import EPS, coupling_and_normalise, fast_share, pad_to_chunks, psi_decay_factors


def delta_rule_tokens(M, q, k, v, beta):
    """Run ``M <- M + beta_t k_t (v_t - M^T k_t)^T``, ``o_t = M^T q_t`` over the tokens.

    M: (B, H, d, d) start state; q, k, v: (B, H, C, d); beta: (B, H, C).
    Returns the outputs o (B, H, C, d), the written values u_t = beta_t (v_t - M^T k_t)
    (B, H, C, d), and the end state.
    """
    outputs, written = [], []
    for t in range(q.shape[2]):
        k_t, v_t, q_t = k[:, :, t], v[:, :, t], q[:, :, t]
        u_t = beta[:, :, t, None] * (v_t - torch.einsum("bhij,bhi->bhj", M, k_t))
        M = M + torch.einsum("bhi,bhj->bhij", k_t, u_t)
        outputs.append(torch.einsum("bhij,bhi->bhj", M, q_t))
        written.append(u_t)
    return torch.stack(outputs, 2), torch.stack(written, 2), M


def naive_dual_state_delta_rule(
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
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    state_after_chunks: torch.Tensor | None = None,
):
    """Dual-state delta rule, token by token. Returns the mixed output O (B, H, L, d).

    ``flux(K, U, valid)`` maps a chunk's keys and written values (B, H, N, C, d) and
    its valid-token mask (B, N, C) to the coupling strength psi (B, H, N).

    ``initial_state``: the states (S_fast, S_slow), (B, H, d, d) each, that the first chunk
    reads (zero when None): the input then continues one whose chunks ended there.
    ``state_after_chunks`` (B,) integers in [0, N]: also return the states after that many
    chunks of each sample, as (O, (S_fast, S_slow)).
    """
    B, H, L, d = q.shape
    q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask = pad_to_chunks(
        chunk_size, q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask=mask
    )
    beta = beta * mask[:, None]
    zero = q.new_zeros(B, H, d, d)
    S_fast, S_slow = (zero, zero) if initial_state is None else initial_state
    saved = (S_fast, S_slow)
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        chunk = slice(start, start + chunk_size)
        Q, K, V, b = q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], beta[:, :, chunk]
        valid = mask[:, chunk]
        count = valid.sum(-1).clamp(min=1)[:, None]

        # psi reads the values the chunk writes when run from a zero state.
        _, U, _ = delta_rule_tokens(zero, Q, K, V, b)
        psi = flux(K[:, :, None], U[:, :, None], valid[:, None])[:, :, 0]

        mean_decay_fast = (decay_fast[:, :, chunk] * valid[:, None]).sum(-1) / count
        mean_decay_slow = (decay_slow[:, :, chunk] * valid[:, None]).sum(-1) / count
        factor_fast, factor_slow = psi_decay_factors(psi)
        S_fast_decayed = S_fast * (mean_decay_fast * factor_fast)[..., None, None]
        S_slow_decayed = S_slow * (mean_decay_slow * factor_slow)[..., None, None]
        R_fast = S_fast_decayed / (torch.linalg.matrix_norm(S_fast_decayed)[..., None, None] + EPS)
        R_slow = S_slow_decayed / (torch.linalg.matrix_norm(S_slow_decayed)[..., None, None] + EPS)

        O_fast, _, M_fast = delta_rule_tokens(R_fast, Q, K, V, b)
        O_slow, _, M_slow = delta_rule_tokens(R_slow, Q, K, V, b)
        alpha = fast_share(psi)[..., None, None]
        O_fast = gate_fast[:, :, chunk, None] * O_fast
        O_slow = gate_slow[:, :, chunk, None] * O_slow
        outputs.append(alpha * O_fast + (1 - alpha) * O_slow)

        new_fast = S_fast_decayed + F.dropout(M_fast - R_fast, state_dropout, training)
        new_slow = S_slow_decayed + F.dropout(M_slow - R_slow, state_dropout, training)
        new_fast, new_slow = coupling_and_normalise(new_fast, new_slow, psi)
        # A chunk without valid tokens (padding of a shorter sample) leaves the states as they were.
        keep = valid.any(-1)[:, None, None, None]
        S_fast = torch.where(keep, new_fast, S_fast)
        S_slow = torch.where(keep, new_slow, S_slow)
        if state_after_chunks is not None:
            here = (state_after_chunks == start // chunk_size + 1)[:, None, None, None]
            saved = (torch.where(here, S_fast, saved[0]), torch.where(here, S_slow, saved[1]))
    out = torch.cat(outputs, 2)[:, :, :L]
    return out if state_after_chunks is None else (out, saved)
