"""The dual-state delta rule of a layer fused with its output norm and gate, for CPU
inference (numba).

In eager PyTorch the layer's delta rule is some fifteen small operations per chunk (q/k
norms, contiguous copies, a batched triangular solve, the causal scores, the flux, the
state steps, the gate mix, the output RMSNorm and gate), each a pass over memory. Here
one compiled loop per (sample, head) does all of it, chunk after chunk, on rows that
stay in cache. The convolution and activations before it stay in PyTorch
(``delta_net_features``): its vectorised exp is several times faster than numba's scalar
one, which made a kernel that also did them slower than eager code.

The math is that of ``chunk_dual_state_delta_rule`` and ``delta_net_output`` in
``layers/dual_state_delta_net.py``, which the tests compare it with. Per chunk, over its rows i, j:
- q and k normalised per head;
- U = (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta) V and W likewise with K for V,
  by forward substitution: u_i = beta_i (v_i - sum_{j<i} (k_i . k_j) u_j);
- psi from the flux MLP, alpha = 0.5 + 0.3 psi, the chunk's mean decays;
- R_fast, R_slow: the states decayed and normalised (zero in the first chunk, which
  therefore needs no W);
- o_i = alpha g_fast,i (qw_i R_fast + au_i) + (1 - alpha) g_slow,i (qw_i R_slow + au_i),
  au_i = sum_{j<=i} (q_i . k_j) u_j, qw_i = q_i - sum_{j<=i} (q_i . k_j) w_j;
- the states updated with K^T U - K^T W R, coupled and normalised (a chunk without valid
  tokens leaves them as they were);
- output RMSNorm(o) * norm_weight * output gate.

Also here: the causal convolution of packed batches, and the passes around the int8
products of ``LAMConfig.cpu_int8`` (inference/int8.py): rows to uint8 levels, the FFN's
scale-back, GELU and levels in one pass, rows scaled back.

numba compiles the kernel on first use (about 20 s) and caches the machine code on disk
(``cache=True``), so later processes load it at once.
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np
import torch

from .common import EPS, PSI_MAX, PSI_MIN, QK_NORM_EPS

# fastmath with NaNs and infinities kept ("nnan", "ninf" off): reassociation lets the
# dot products vectorise, and a NaN in the input still shows in the output.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


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


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _forward_substitution(rows, width, kh, betah, c0, c1):
    """rows[c0:c1, :width] <- (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta) rows[c0:c1, :width],
    in place: u_i = beta_i (v_i - sum_{j<i} (k_i . k_j) u_j), for U and W side by side."""
    for i in range(c0, c1):
        row_i, k_i = rows[i], kh[i]
        if betah[i] == 0.0:
            row_i[:] = 0.0
            continue
        for j in range(c0, i):
            s = _dot(k_i, kh[j])
            row_j = rows[j]
            for c in range(width):
                row_i[c] -= s * row_j[c]
        for c in range(width):
            row_i[c] *= betah[i]


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _flux(mean_k, mean_u, score, w_hidden, b_hidden, w_out, b_out):
    """psi (ResonanceFlux.forward) from the chunk's mean key, mean u and score."""
    d = mean_k.shape[0]
    y = b_out[0]
    for j in range(w_hidden.shape[0]):
        z = b_hidden[j] + w_hidden[j, 2 * d] * score
        for c in range(d):
            z += w_hidden[j, c] * mean_k[c] + w_hidden[j, d + c] * mean_u[c]
        y += w_out[j] * z * _sigmoid(z)
    return min(max(_sigmoid(y), np.float32(PSI_MIN)), np.float32(PSI_MAX))


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _normalise_state(state, eps):
    """state / (||state||_F + eps), in place."""
    total = np.float32(0.0)
    for r in range(state.shape[0]):
        total += _dot(state[r], state[r])
    scale = np.float32(1.0) / (math.sqrt(total) + eps)
    for r in range(state.shape[0]):
        for c in range(state.shape[1]):
            state[r, c] *= scale


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _state_step(state_fast, state_slow, read_fast, read_slow, ktuw, decay_fast, decay_slow, psi, first_chunk, eps):
    """Both states over one chunk, in place (``state_step`` and ``coupling_and_normalise``
    in ops/): S <- S decay + K^T U - (K^T W) R, the coupling, the norms. ``ktuw`` is
    [K^T U | K^T W]; R (and so K^T W R) is zero in the first chunk."""
    d = state_fast.shape[0]
    for r in range(d):
        for c in range(d):
            state_fast[r, c] = state_fast[r, c] * decay_fast + ktuw[r, c]
            state_slow[r, c] = state_slow[r, c] * decay_slow + ktuw[r, c]
    if not first_chunk:
        for r in range(d):
            for m in range(d):
                ktw = ktuw[r, d + m]
                for c in range(d):
                    state_fast[r, c] -= ktw * read_fast[m, c]
                    state_slow[r, c] -= ktw * read_slow[m, c]
    strength = np.float32(0.05) + np.float32(0.1) * psi  # as ops.common.coupling_and_normalise
    for r in range(d):
        for c in range(d):
            state_fast[r, c] += strength * psi * state_slow[r, c]
    for r in range(d):
        for c in range(d):
            state_slow[r, c] += strength * (np.float32(1.0) - psi) * state_fast[r, c]
    _normalise_state(state_fast, eps)
    _normalise_state(state_slow, eps)


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _delta_rule_layer(q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, output_gate, valid, starts,
                      lengths, chunk_size, bilinear, temperature, w_hidden, b_hidden, w_out, b_out, norm_weight, rms_eps,
                      qk_eps, state_eps, out, threads):
    """Rows of tokens, sample b's from starts[b] to starts[b] + lengths[b]: q, k, v (N, H, d)
    before the q/k norms; beta, the decays, the gates (N, H) and output_gate (N, H * d)
    after their sigmoids; valid (N,) bool; the flux parameters; out (N, H * d) is written
    on the samples' rows. The (sample, head) tasks are spread over ``threads`` threads."""
    H, d = q.shape[1], q.shape[2]
    tasks = starts.shape[0] * H
    longest = 1
    for b in range(starts.shape[0]):
        longest = max(longest, lengths[b])
    # Scratch buffers once per block of tasks, not per (sample, head): for a short sentence,
    # allocating and zeroing a dozen buffers from both threads at once cost as much as the
    # arithmetic (15% of the layer's time on STS-B sentences). Task bh goes to thread
    # bh % threads: one long document's 12 heads split 6 and 6 on two threads (prange hands
    # each thread a contiguous range of blocks, so blocks taking every blocks-th task gave
    # one thread 8 heads and the other 4). Within a thread, a few blocks.
    threads = max(1, min(tasks, threads))
    per_thread = max(1, min(4, tasks // threads))
    for block in numba.prange(threads * per_thread):
        thread, part = block // per_thread, block % per_thread
        qh_rows = np.empty((longest, d), np.float32)
        kh_rows = np.empty((longest, d), np.float32)
        uw_rows = np.empty((longest, 2 * d), np.float32)  # [v | k], overwritten by [U | W]
        betah_rows = np.empty(longest, np.float32)
        state_fast = np.empty((d, d), np.float32)
        state_slow = np.empty((d, d), np.float32)
        read_fast = np.empty((d, d), np.float32)  # R: the states as a chunk reads them
        read_slow = np.empty((d, d), np.float32)
        ktuw = np.empty((d, 2 * d), np.float32)  # [K^T U | K^T W]
        mean_k = np.empty(d, np.float32)
        mean_u = np.empty(d, np.float32)
        acc = np.empty(2 * d, np.float32)
        o = np.empty(d, np.float32)
        for bh in range(thread + threads * part, tasks, threads * per_thread):
            b, h = bh // H, bh % H
            s0, L = starts[b], lengths[b]
            # This head's rows, contiguous: every product below reads them many times.
            qh, kh, uw, betah = qh_rows[:L], kh_rows[:L], uw_rows[:L], betah_rows[:L]
            for t in range(L):
                q_t, k_t, v_t, qh_t, kh_t, uw_t = q[s0 + t, h], k[s0 + t, h], v[s0 + t, h], qh[t], kh[t], uw[t]
                square_q = np.float32(0.0)
                square_k = np.float32(0.0)
                for c in range(d):
                    square_q += q_t[c] * q_t[c]
                    square_k += k_t[c] * k_t[c]
                scale_q = np.float32(1.0) / max(math.sqrt(square_q), qk_eps)
                scale_k = np.float32(1.0) / max(math.sqrt(square_k), qk_eps)
                for c in range(d):
                    qh_t[c] = q_t[c] * scale_q
                    kh_t[c] = k_t[c] * scale_k
                    uw_t[c] = v_t[c]
                    uw_t[d + c] = kh_t[c]
                betah[t] = beta[s0 + t, h] if valid[s0 + t] else np.float32(0.0)
            if L > chunk_size:  # the states start at zero; a single chunk neither reads nor updates them
                state_fast[:] = 0.0
                state_slow[:] = 0.0
            for c0 in range(0, L, chunk_size):
                c1 = min(c0 + chunk_size, L)
                # The states are zero in the first chunk: it needs U only, not W.
                width = d if c0 == 0 else 2 * d
                _forward_substitution(uw, width, kh, betah, c0, c1)

                # K^T [U | W] (rows of U and W are zero on padding), the means over valid tokens.
                ktuw[:] = 0.0
                mean_k[:] = 0.0
                mean_u[:] = 0.0
                count = np.float32(0.0)
                mean_fast = np.float32(0.0)
                mean_slow = np.float32(0.0)
                for t in range(c0, c1):
                    k_t, uw_t = kh[t], uw[t]
                    for r in range(d):
                        k_tr = k_t[r]
                        for c in range(width):
                            ktuw[r, c] += k_tr * uw_t[c]
                    if valid[s0 + t]:
                        count += 1.0
                        mean_fast += decay_fast[s0 + t, h]
                        mean_slow += decay_slow[s0 + t, h]
                        for c in range(d):
                            mean_k[c] += k_t[c]
                            mean_u[c] += uw_t[c]
                has_valid = count > 0.0
                count = max(count, np.float32(1.0))
                # sum_t k_t^T W_bil u_t over valid tokens = <W_bil, K^T U>
                score = np.float32(0.0)
                for r in range(d):
                    for c in range(d):
                        score += bilinear[h, r, c] * ktuw[r, c]
                for c in range(d):
                    mean_k[c] /= count
                    mean_u[c] /= count
                psi = _flux(mean_k, mean_u, score / count / temperature[h], w_hidden, b_hidden, w_out, b_out)
                # ops.common.fast_share and psi_decay_factors
                alpha = np.float32(0.5) + np.float32(0.3) * psi
                mean_fast = mean_fast / count * (np.float32(1.0) - np.float32(0.10) * psi)
                mean_slow = mean_slow / count * (np.float32(1.0) - np.float32(0.05) * psi)
                if c0 > 0:
                    for r in range(d):
                        for c in range(d):
                            read_fast[r, c] = state_fast[r, c] * mean_fast
                            read_slow[r, c] = state_slow[r, c] * mean_slow
                    _normalise_state(read_fast, state_eps)
                    _normalise_state(read_slow, state_eps)

                for i in range(c0, c1):
                    # acc = sum_{j<=i} (q_i . k_j) [u_j | w_j] = [(A U)_i | (A W)_i]
                    acc[:width] = 0.0
                    q_i = qh[i]
                    for j in range(c0, i + 1):
                        s = _dot(q_i, kh[j])
                        uw_j = uw[j]
                        for c in range(width):
                            acc[c] += s * uw_j[c]
                    g_fast = alpha * gate_fast[s0 + i, h]
                    g_slow = (np.float32(1.0) - alpha) * gate_slow[s0 + i, h]
                    for c in range(d):
                        o[c] = (g_fast + g_slow) * acc[c]
                    if c0 > 0:  # + (q_i - (A W)_i) (g_fast R_fast + g_slow R_slow)
                        for r in range(d):
                            qw_r = q_i[r] - acc[d + r]
                            a_fast, a_slow = g_fast * qw_r, g_slow * qw_r
                            for c in range(d):
                                o[c] += a_fast * read_fast[r, c] + a_slow * read_slow[r, c]
                    square = np.float32(0.0)
                    for c in range(d):
                        square += o[c] * o[c]
                    scale = np.float32(1.0) / math.sqrt(square / d + rms_eps)
                    for c in range(d):
                        out[s0 + i, h * d + c] = o[c] * scale * norm_weight[c] * output_gate[s0 + i, h * d + c]

                if c1 == L or not has_valid:
                    continue  # the states are not read again, or this chunk leaves them as they were
                _state_step(state_fast, state_slow, read_fast, read_slow, ktuw, mean_fast, mean_slow, psi, c0 == 0,
                            state_eps)


@functools.cache
def _start_thread_pool() -> None:
    """Start numba's thread pool, once. Starting it sets the OpenMP thread count, which
    torch's CPU kernels read too: without putting torch's back, a process told
    torch.set_num_threads(1) would change its numerics (the order of parallel sums)
    after its first call here."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    torch.set_num_threads(threads)


def _use_torch_threads() -> None:
    """numba keeps its own thread pool: start it, and use as many threads as torch is told to."""
    _start_thread_pool()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def delta_rule_layer(q, k, v, output_gate, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask, flux,
                     norm_weight, eps: float, chunk_size: int, segments=None) -> torch.Tensor:
    """RMSNorm(o) * norm_weight * output_gate, float32: what ``delta_net_output`` gives
    before the output projection. Arguments as ``delta_net_features`` returns them
    (float32): q, k, v (..., H, d), q and k not yet normalised; output_gate (..., H * d);
    beta, the decays and the gates (..., H); ``flux`` the layer's ResonanceFlux.
    Inference only: no gradient flows through it.

    A padded batch: the leading dimensions are (B, L) and ``mask`` (B, L) bool marks the
    valid tokens; the result is (B, L, H * d). A packed batch (``segments`` = (starts,
    lengths), int64 (B,) each, ``mask`` None): the leading dimension is the N valid rows of
    all samples, sample b's rows from starts[b] on; the result is (N, H * d)."""
    H, d = q.shape[-2:]
    if segments is None:
        B, L = mask.shape
        starts, lengths = np.arange(B, dtype=np.int64) * L, np.full(B, L, dtype=np.int64)
        valid = mask.reshape(-1).numpy()
    else:
        starts, lengths = (t.numpy() for t in segments)
        valid = np.ones(q.shape[0], dtype=np.bool_)
    rows = (lambda t: t.flatten(0, 1)) if segments is None else (lambda t: t)  # (B, L, ...) -> (B * L, ...)
    out = torch.empty(valid.shape[0], H * d)
    _use_torch_threads()
    as_array = lambda t: t.detach().float().numpy()
    with _launch_lock:
        _delta_rule_layer(
            *(as_array(rows(t)) for t in (q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, output_gate)),
            valid, starts, lengths, chunk_size,
            as_array(flux.bilinear), as_array(flux.temperature), as_array(flux.hidden.weight), as_array(flux.hidden.bias),
            as_array(flux.out.weight[0]), as_array(flux.out.bias), as_array(norm_weight),
            np.float32(eps), np.float32(QK_NORM_EPS), np.float32(EPS), out.numpy(), 4 * numba.get_num_threads(),
        )
    return out if segments is not None else out.unflatten(0, mask.shape)


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _packed_causal_conv(x, taps, positions, y):
    """y[t] = sum over s <= min(K - 1, positions[t]) of taps[K - 1 - s] * x[t - s, :C]."""
    K, C = taps.shape
    for t in numba.prange(x.shape[0]):
        reach = min(K - 1, positions[t])
        row, out = x[t], y[t]
        for c in range(C):
            out[c] = taps[K - 1, c] * row[c]
        for s in range(1, reach + 1):
            tap, row = taps[K - 1 - s], x[t - s]
            for c in range(C):
                out[c] += tap[c] * row[c]


def packed_causal_conv(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The depthwise causal convolution (weight (C, 1, K)) of the first C columns of x
    (N, >= C), the rows of a packed batch, row t at position positions[t] of its sample: no
    row reads the sample before it. (N, C) float32. x is read in place when contiguous,
    as the input projection gives it: a column slice of it would not vectorise."""
    y = torch.empty(x.shape[0], weight.shape[0])
    _use_torch_threads()
    with _launch_lock:
        _packed_causal_conv(x.detach().float().contiguous().numpy(),
                            weight.detach()[:, 0].t().contiguous().float().numpy(), positions.numpy(), y.numpy())
    return y


# Abramowitz and Stegun 7.1.28: erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0, with an
# error below 3e-7. Only products and a division: unlike math.erf it vectorises.
_ERF_COEFFICIENTS = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _gelu(x):
    """x Phi(x) (exact GELU, as torch's default) through the erf above."""
    a1, a2, a3, a4, a5, a6 = _ERF_COEFFICIENTS
    z = abs(x) * np.float32(0.7071067811865476)
    p = np.float32(1.0) + z * (np.float32(a1) + z * (np.float32(a2) + z * (np.float32(a3) + z * (
        np.float32(a4) + z * (np.float32(a5) + z * np.float32(a6))))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p  # overflows to inf past |x| of about 60: erf is then 1, as it should be
    erf = np.float32(1.0) - np.float32(1.0) / p
    return np.float32(0.5) * x * (np.float32(1.0) + (erf if x >= 0 else -erf))


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _larger(largest, value):
    """value where it is larger, else largest: a NaN value is passed over."""
    return value if value > largest else largest


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _largest_magnitude(row, column_scale):
    """max |row column_scale| (at least 1e-30), NaNs passed over. Eight running maxima over
    interleaved columns: a single one is a chain of dependent compares that LLVM does not
    vectorise, 2.5x slower on rows of 1,536."""
    n = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(1e-30)
    for j in range(0, n - n % 8, 8):
        m0 = _larger(m0, abs(row[j] * column_scale[j]))
        m1 = _larger(m1, abs(row[j + 1] * column_scale[j + 1]))
        m2 = _larger(m2, abs(row[j + 2] * column_scale[j + 2]))
        m3 = _larger(m3, abs(row[j + 3] * column_scale[j + 3]))
        m4 = _larger(m4, abs(row[j + 4] * column_scale[j + 4]))
        m5 = _larger(m5, abs(row[j + 5] * column_scale[j + 5]))
        m6 = _larger(m6, abs(row[j + 6] * column_scale[j + 6]))
        m7 = _larger(m7, abs(row[j + 7] * column_scale[j + 7]))
    largest = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for j in range(n - n % 8, n):
        largest = _larger(largest, abs(row[j] * column_scale[j]))
    return largest


@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _write_levels(row, column_scale, out):
    """out = round(127 row column_scale / m) + 128 as uint8 (1 to 255), m = max |row column_scale|;
    returns m, or NaN where the row holds a NaN: the maximum passes NaNs over and the levels
    cannot hold one, so the magnitude carries it to the output."""
    largest = _largest_magnitude(row, column_scale)
    total = np.float32(0.0)
    for j in range(row.shape[0]):
        total += row[j]
    factor = np.float32(127.0) / largest
    for j in range(row.shape[0]):
        # The sum is at least 1.5: truncation rounds it (half up).
        out[j] = np.uint8(np.int32(np.float32(128.5) + row[j] * column_scale[j] * factor))
    return largest if total == total else np.float32(np.nan)


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rows_to_levels(x, column_scale, out, magnitude):
    """Row i of x times column_scale, as uint8 levels of its largest magnitude (magnitude[i])."""
    for i in numba.prange(x.shape[0]):
        magnitude[i] = _write_levels(x[i], column_scale, out[i])


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gelu_rows_to_levels(y, magnitude_in, bias, column_scale, out, magnitude):
    """GELU(y[i] magnitude_in[i] + bias) times column_scale, as uint8 levels of its largest
    magnitude (magnitude[i]); y is overwritten."""
    for i in numba.prange(y.shape[0]):
        row, scale = y[i], magnitude_in[i]
        # A loop of its own: with the maximum in the same loop it does not vectorise.
        for j in range(row.shape[0]):
            row[j] = _gelu(row[j] * scale + bias[j])
        magnitude[i] = _write_levels(row, column_scale, out[i])


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _scale_rows(y, magnitude, bias):
    """y[i] = y[i] * magnitude[i] + bias, in place."""
    for i in numba.prange(y.shape[0]):
        row, scale = y[i], magnitude[i]
        for j in range(row.shape[0]):
            row[j] = row[j] * scale + bias[j]


def _vector(values: torch.Tensor | None, columns: int, default: float) -> np.ndarray:
    """``values`` (columns,) as a float32 array, or ``default`` in every column where None."""
    return (torch.full((columns,), default) if values is None else values.float().contiguous()).numpy()


def rows_to_levels(x: torch.Tensor, column_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x (N, C) times ``column_scale`` (C,) (or 1), as 255 levels of its largest
    magnitude after that: (uint8 (N, C), round(127 row / magnitude) + 128; magnitudes (N,)),
    in one pass over x."""
    x = x.detach().float().contiguous()
    out, magnitude = torch.empty(x.shape, dtype=torch.uint8), torch.empty(x.shape[0])
    _use_torch_threads()
    with _launch_lock:
        _rows_to_levels(x.numpy(), _vector(column_scale, x.shape[1], 1.0), out.numpy(), magnitude.numpy())
    return out, magnitude


def gelu_rows_to_levels(y: torch.Tensor, magnitude: torch.Tensor, bias: torch.Tensor | None,
                        column_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows_to_levels(GELU(scale_rows(y, magnitude, bias)), column_scale)`` in one pass,
    for y (N, C) float32, contiguous, which it overwrites. GELU to 3e-7 of erf's value."""
    out, new_magnitude = torch.empty(y.shape, dtype=torch.uint8), torch.empty(y.shape[0])
    _use_torch_threads()
    with _launch_lock:
        _gelu_rows_to_levels(y.numpy(), magnitude.numpy(), _vector(bias, y.shape[1], 0.0),
                             _vector(column_scale, y.shape[1], 1.0), out.numpy(), new_magnitude.numpy())
    return out, new_magnitude


def scale_rows(y: torch.Tensor, magnitude: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (N, C) float32, contiguous, in place: row i times magnitude[i], plus ``bias`` (C,) (or 0)."""
    _use_torch_threads()
    with _launch_lock:
        _scale_rows(y.numpy(), magnitude.numpy(), _vector(bias, y.shape[1], 0.0))
    return y
