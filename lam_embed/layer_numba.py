"""The delta rule of an input of one chunk, fused with the output norm and gate, for
CPU inference (numba).

An input of at most ``chunk_size`` tokens is one chunk with zero states (SPEC.md,
notes): the layer is then a single-chunk delta rule mixed by the gates. In eager
PyTorch that part is some fifteen small operations per layer (q/k norms, contiguous
copies, a batched triangular solve, the causal scores, the flux, the gate mix, the
output RMSNorm and gate), each a pass over memory. Here one compiled loop per (sample,
head) does all of it on rows that stay in cache. The convolution and activations before
it stay in PyTorch (``delta_net_features``): its vectorised exp is several times faster
than numba's scalar one, which made a kernel that also did them slower than eager code.

The math is that of ``chunk_dual_state_delta_rule`` (one chunk) and ``delta_net_output``
in ``modeling_lam.py``, which the tests compare it with:
- q and k normalised per head;
- U = (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta) V, by forward substitution:
  u_i = beta_i (v_i - sum_{j<i} (k_i . k_j) u_j);
- psi from the flux MLP, alpha = 0.5 + 0.3 psi;
- o_i = (alpha g_fast,i + (1 - alpha) g_slow,i) sum_{j<=i} (q_i . k_j) u_j;
- output RMSNorm(o) * norm_weight * output gate.

numba compiles the kernel on first use (about 7 s) and caches the machine code on disk
(``cache=True``), so later processes load it at once.
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np
import torch

from .ops.common import QK_NORM_EPS

# fastmath with NaNs and infinities kept ("nnan", "ninf" off): reassociation lets the
# dot products vectorise, and a NaN in the input still shows in the output.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _normalise(row, eps):
    total = np.float32(0.0)
    for c in range(row.shape[0]):
        total += row[c] * row[c]
    scale = np.float32(1.0) / max(math.sqrt(total), eps)
    for c in range(row.shape[0]):
        row[c] *= scale


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _dot(a, b):
    total = np.float32(0.0)
    for c in range(a.shape[0]):
        total += a[c] * b[c]
    return total


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + math.exp(-x))


# numba's fallback thread pool ("workqueue", where neither OpenMP nor TBB is found)
# aborts the process when two threads launch parallel kernels at once: callers that
# encode from several threads take turns.
_launch_lock = threading.Lock()


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _single_chunk_layer(q, k, v, beta, gate_fast, gate_slow, output_gate, valid, bilinear, temperature,
                        w_hidden, b_hidden, w_out, b_out, norm_weight, rms_eps, qk_eps, out):
    """q, k, v (B, L, H, d) before the q/k norms; beta, gate_fast, gate_slow (B, L, H) and
    output_gate (B, L, H * d) after their sigmoids; valid (B, L) bool; the flux parameters;
    out (B, L, H * d) is written."""
    B, L, H, d = q.shape
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        # This head's rows, contiguous: every product below reads them many times.
        qh = np.empty((L, d), np.float32)
        kh = np.empty((L, d), np.float32)
        u = np.empty((L, d), np.float32)
        betah = np.empty(L, np.float32)
        for t in range(L):
            qh[t] = q[b, t, h]
            kh[t] = k[b, t, h]
            _normalise(qh[t], qk_eps)
            _normalise(kh[t], qk_eps)
            u[t] = v[b, t, h]  # v, overwritten by u below
            betah[t] = beta[b, t, h] if valid[b, t] else np.float32(0.0)

        # Forward substitution; row i of v becomes row i of u in place.
        for i in range(L):
            u_i, k_i = u[i], kh[i]
            if betah[i] == 0.0:
                u_i[:] = 0.0
                continue
            for j in range(i):
                s = _dot(k_i, kh[j])
                u_j = u[j]
                for c in range(d):
                    u_i[c] -= s * u_j[c]
            for c in range(d):
                u_i[c] *= betah[i]

        # Flux: means over the valid tokens, and sum_t k_t^T W u_t.
        features = np.zeros(2 * d + 1, np.float32)
        w_u = np.empty(d, np.float32)
        count = np.float32(0.0)
        score = np.float32(0.0)
        for t in range(L):
            if not valid[b, t]:
                continue
            count += 1.0
            for c in range(d):
                features[c] += kh[t, c]
                features[d + c] += u[t, c]
            w_u[:] = 0.0
            for r in range(d):
                for c in range(d):
                    w_u[r] += bilinear[h, r, c] * u[t, c]
            for r in range(d):
                score += kh[t, r] * w_u[r]
        count = max(count, np.float32(1.0))
        for c in range(2 * d):
            features[c] /= count
        features[2 * d] = score / count / temperature[h]
        y = b_out[0]
        for j in range(w_hidden.shape[0]):
            z = b_hidden[j]
            for c in range(2 * d + 1):
                z += w_hidden[j, c] * features[c]
            y += w_out[j] * z * _sigmoid(z)
        psi = min(max(_sigmoid(y), np.float32(0.01)), np.float32(0.99))
        alpha = np.float32(0.5) + np.float32(0.3) * psi

        o = np.empty(d, np.float32)
        for i in range(L):
            o[:] = 0.0
            q_i = qh[i]
            for j in range(i + 1):
                s = _dot(q_i, kh[j])
                u_j = u[j]
                for c in range(d):
                    o[c] += s * u_j[c]
            gate = alpha * gate_fast[b, i, h] + (np.float32(1.0) - alpha) * gate_slow[b, i, h]
            square = np.float32(0.0)
            for c in range(d):
                o[c] *= gate
                square += o[c] * o[c]
            scale = np.float32(1.0) / math.sqrt(square / d + rms_eps)
            for c in range(d):
                out[b, i, h * d + c] = o[c] * scale * norm_weight[c] * output_gate[b, i, h * d + c]


@functools.cache
def _start_thread_pool() -> None:
    """Start numba's thread pool, once. Starting it sets the OpenMP thread count, which
    torch's CPU kernels read too: without putting torch's back, a process told
    torch.set_num_threads(1) would change its numerics (the order of parallel sums)
    after its first call here."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    torch.set_num_threads(threads)


def single_chunk_layer(q, k, v, output_gate, beta, gate_fast, gate_slow, mask, flux, norm_weight,
                       eps: float) -> torch.Tensor:
    """RMSNorm(o) * norm_weight * output_gate, (B, L, H * d) float32, for an input of one
    chunk: what ``delta_net_output`` gives before the output projection. Arguments as
    ``delta_net_features`` returns them (float32): q, k, v (B, L, H, d), q and k not yet
    normalised; output_gate (B, L, H * d); beta, gate_fast, gate_slow (B, L, H). The decays
    are not read: with zero states they change nothing. ``mask`` (B, L) bool; ``flux`` the
    layer's ResonanceFlux. Inference only: no gradient flows through it."""
    B, L, H, d = q.shape
    out = torch.empty(B, L, H * d)
    _start_thread_pool()
    # numba keeps its own thread pool: use as many threads as torch is told to.
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    as_array = lambda t: t.detach().float().numpy()  # noqa: E731
    with _launch_lock:
        _single_chunk_layer(
            *(as_array(t) for t in (q, k, v, beta, gate_fast, gate_slow, output_gate)), mask.numpy(),
            as_array(flux.bilinear), as_array(flux.temperature), as_array(flux.hidden.weight), as_array(flux.hidden.bias),
            as_array(flux.out.weight[0]), as_array(flux.out.bias), as_array(norm_weight),
            np.float32(eps), np.float32(QK_NORM_EPS), out.numpy(),
        )
    return out
