"""Fused Triton implementation of the dual-state delta rule (docs/SPEC.md section 2).

Same contract as ``chunk_dual_state_delta_rule`` (chunk.py), computed by four kernels.
For 32,768 tokens of 12 heads x 32 on an H200, the layer's token mixer from its bfloat16
input projection to its output projection takes 0.27 ms (256 x 128 tokens) to 0.64 ms
(1 x 32,768) of kernel time (benchmarks/results/kernel-variants-h200.json).

A chunk's unit lower-triangular system is solved by forward substitution over blocks of
BT rows, so the C x C matrices of chunk.py never exist: with P_U = sum_{j<i} K_j^T U_j
and P_W = sum_{j<i} K_j^T W_j over the earlier blocks of the chunk,

    U_i = T_i (Vb_i - Kb_i P_U),   W_i = T_i (Kb_i - Kb_i P_W),

where T_i = (I + strictly_lower(Kb_i K_i^T))^-1 is the exact inverse of block i's
diagonal block (block doubling, as flash-linear-attention's solve_tril merges its blocks).

1. ``block_prepare_kernel``, one program per (head, block, sample), all in parallel:
   everything of a block that does not need P_U or P_W, in particular T_i (most of the
   work). It hands on QT = Q - A_i T_i Kb, QV = A_i T_i Vb (A_i = lower_incl(Q_i K_i^T)),
   the d x d products K_i^T T_i Kb, K_i^T T_i Vb and a few column sums.
2. ``chunk_scan_kernel``, one program per (head, chunk, sample): the blocks of the chunk
   in order, two small products a block (see its docstring), giving the rows
   A U and Q - A W and, at the end of the chunk, K^T U = P_U and K^T W = P_W. psi (the
   ResonanceFlux MLP) and the mean decays are computed here from the mean key, the mean
   written value and sum_t k_t^T W_bil u_t = <W_bil, K^T U> (rows of U are zero where
   beta = 0, so this equals the sum over valid tokens). For a single-chunk input the
   states are zero and this kernel writes the final output.
3. ``state_recurrence_kernel``, one program per (sample, head), sequential over the
   chunks: the d x d recurrence of the two states (decay, normalise, update with
   K^T U - K^T W R, coupling, normalise; chunks without valid tokens are skipped).
   It writes the normalised states R_fast, R_slow each chunk reads.
4. ``chunk_output_kernel``, one program per (head, rows of a chunk, sample):
   O = alpha g_f (QW R_f + AU) + (1 - alpha) g_s (QW R_s + AU).

(A single kernel that ran the blocks of a chunk one after the other, inverses included,
took 0.41 to 0.88 ms for the same work: its chain of small dependent products left the
GPU waiting; split, the inverses run in parallel.)

With ``qk_l2norm`` kernel 1 normalises each row of q and k after loading them (the
layer passes them unnormalised, in its own dtype), so that float32 copies of q and k
never exist in memory. The inputs may mix dtypes. The layer's inference path goes
further (``conv_taps``, layer.delta_rule_from_projection): the kernels read
the input projection itself and apply the causal convolution, SiLU and sigmoids on
load, so that the activations never exist in memory either; and with ``output_norm``
(layer.delta_net_from_projection) the kernel that writes O applies the layer's
per-head RMSNorm and output gate first.

Arithmetic is float32 (states included) whatever the input dtype; products run on the
tensor cores with the operand precision of LaunchSettings: for float32 inputs "tf32x3" (three
tf32 passes, float32 accuracy: 1e-6 from chunk.py, where plain tf32 gives 4e-3); for
bfloat16/float16 inputs bfloat16 operands in kernel 1 and tf32 in kernels 2 and 4, with
the blocks' results handed on in the input's dtype (errors near 1% of the output scale,
the size of a bfloat16 model's own rounding). Kernel 3 multiplies in exact float32.

Backward: ``DualStateDeltaRuleFunction`` recomputes the forward with
``chunk_dual_state_delta_rule`` under autograd and backpropagates through it, so the
gradients are those of the "chunk" implementation. State dropout while training and
a flux that is not a ResonanceFlux also go to the chunk implementation (the dropout
mask lives in torch's generator there).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..chunk import chunk_dual_state_delta_rule
from ..common import EPS, PSI_MAX, PSI_MIN, QK_NORM_EPS, l2norm

# The epsilons of the state and of the q/k normalisations and the bounds of psi, as
# constants the kernels can read.
STATE_EPS = tl.constexpr(EPS)
QK_EPS = tl.constexpr(QK_NORM_EPS)
PSI_LOW = tl.constexpr(PSI_MIN)
PSI_HIGH = tl.constexpr(PSI_MAX)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b in float32: PREC "bf16" rounds both operands to bfloat16 first (the tensor
    cores' fastest input), any other value is tl.dot's input_precision."""
    if PREC == "bf16":
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def unit_lower_inverse(b_a, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """(I + b_a)^-1 for a strictly lower triangular BT x BT block b_a.

    Block doubling: with X the inverse of the block-diagonal part made of s x s
    blocks and E the strictly lower s x s quadrant of each 2s x 2s diagonal block,
    X - X E X is the inverse for 2s x 2s blocks. Each level is exact (no truncated
    power series), so the error stays at float32 rounding even for strongly
    correlated keys, where the Neumann product (I - A)(I + A^2)(I + A^4)... does not.
    """
    o_i = tl.arange(0, BT)
    # s = 1 needs no product: X = I - E.
    b_x = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0) - tl.where(o_i[:, None] // 2 == o_i[None, :] // 2, b_a, 0.0)
    for lvl in tl.static_range(1, LOG2_BT):
        s = 1 << lvl
        m_e = (o_i[:, None] // (2 * s) == o_i[None, :] // (2 * s)) & (o_i[:, None] // s != o_i[None, :] // s)
        b_e = tl.where(m_e, b_a, 0.0)
        b_x = b_x - _mm(_mm(b_x, b_e, PREC), b_x, PREC)
    return b_x


@triton.jit
def _load_taps(taps, D: tl.constexpr, CONV: tl.constexpr):
    """The (KP, D) convolution taps of this head's q, k or v, tap j in row j (KP >= CONV,
    a power of two; extra rows zero), loaded once per program."""
    KP: tl.constexpr = triton.next_power_of_2(CONV)
    o_j = tl.arange(0, KP)
    p = taps + tl.arange(0, D)[None, :] * CONV + o_j[:, None]
    return tl.load(p, mask=(o_j < CONV)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _load_rows(x, b_taps, p_row, p_mask, t, m_t, s_xl, s_ml, D: tl.constexpr, CONV: tl.constexpr):
    """Rows t (at offsets p_row; their mask entries at p_mask) of q, k or v, float32 (BT x D).

    CONV = 0: as stored. CONV > 0: x holds the layer's projection before its causal
    depthwise convolution of CONV taps and the SiLU (layers/dual_state_delta_net.py, delta_net_features),
    and both are applied here, y_t = SiLU(sum_j taps[:, j] x_(t - CONV + 1 + j)), with
    rows before position 0 and rows of padding read as zeros. The earlier rows are mostly
    in cache (the previous block read them), and q, k, v never make a round trip through
    memory. b_taps: _load_taps() of this head's q, k or v.
    """
    p = x + p_row[:, None] + tl.arange(0, D)[None, :]
    if CONV == 0:
        b_y = tl.load(p, mask=m_t[:, None], other=0.0).to(tl.float32)
    else:  # (not an early return: the compiler would still build the code after it)
        o_j = tl.arange(0, b_taps.shape[0])[:, None]
        acc = tl.zeros(p.shape, dtype=tl.float32)
        for shift in tl.static_range(CONV):
            ok = m_t & (t >= shift)
            if shift > 0:
                ok = ok & (tl.load(p_mask - shift * s_ml, mask=ok, other=0) != 0)
            b_x = tl.load(p - shift * s_xl, mask=ok[:, None], other=0.0).to(tl.float32)
            acc += b_x * tl.sum(tl.where(o_j == CONV - 1 - shift, b_taps, 0.0), 0)[None, :]
        b_y = acc * tl.sigmoid(acc)
    return b_y


@triton.jit
def _load_scalars(x, p_s, m_t, CONV: tl.constexpr):
    """Per-token values of beta, a decay or a gate, float32; with CONV > 0 x holds their
    logits (the projection before the sigmoid)."""
    b_x = tl.load(x + p_s, mask=m_t, other=0.0).to(tl.float32)
    if CONV > 0:
        b_x = tl.sigmoid(b_x)
    return b_x


@triton.jit
def block_prepare_kernel(
    q, k, v, beta, mask, qt, qv, maps, vecs, taps,
    L, N, H, CS, h0, HG,  # this launch's heads are h0 + program_id(0); maps and vecs hold HG heads
    s_xb, s_xh, s_xl,  # strides of q, k, v (unit stride on d)
    s_sb, s_sh, s_sl,  # strides of beta
    s_mb, s_ml,  # strides of mask
    C: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, SUB: tl.constexpr,
    QK_NORM: tl.constexpr, PREC: tl.constexpr, CONV: tl.constexpr,
):
    """The part of the chunk computation that needs no earlier block: one program per
    block of SUB x BT rows (per head, block, sample), all of them in parallel.

    For each BT rows, with T = (I + strictly_lower(Kb K^T))^-1 (exact, unit_lower_inverse),
    TV = T Vb, TK = T Kb and A = lower_incl(Q K^T) of those rows, it forms the rows
    QT = Q - A TK and QV = A TV, the d x d products K^T TK and K^T TV, and the column sums
    of TV, TK and of the valid rows of K. With SUB > 1 it folds the earlier BT-row parts
    of its block into the later ones (below), so that chunk_scan_kernel sees one block of
    SUB x BT rows: half the d x d products to store and half the steps in order for SUB = 2.

    Folding: the BT-row parts update P (P_U or P_W) as P <- (I - K^T TK) P + K^T TV (P_W:
    + K^T TK), so with the parts before it composed into (I - Ka) P + Va, a part's rows
    become QT (I - Ka) and QV + QT Va relative to P at the block's start, its column sums
    of TV and TK become those minus (column sums of TK) Va and Ka, and the composition
    takes Ka <- Ka + K^T TK - K^T TK Ka, Va <- Va + K^T TV - K^T TK Va."""
    i_hg, i_blk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = h0 + i_hg
    NBC: tl.constexpr = C // (SUB * BT)
    i_b64 = i_b.to(tl.int64)
    i_n = i_blk // NBC
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    if CONV > 0:
        taps_q = _load_taps(taps + i_h * D * CONV, D, CONV)
        taps_k = _load_taps(taps + (H + i_h) * D * CONV, D, CONV)
        taps_v = _load_taps(taps + (2 * H + i_h) * D * CONV, D, CONV)
    else:  # not read
        taps_q = 0
        taps_k = 0
        taps_v = 0
    i_c = (i_b64 * H + i_h) * N + i_n  # this (sample, head, chunk): its rows start at i_c * C in qt, qv
    b_ka = tl.zeros([D, D], dtype=tl.float32)  # the parts so far, composed (see above)
    b_va = tl.zeros([D, D], dtype=tl.float32)
    b_sum_tv = tl.zeros([D], dtype=tl.float32)
    b_sum_tk = tl.zeros([D], dtype=tl.float32)
    b_sum_k = tl.zeros([D], dtype=tl.float32)
    for s in tl.static_range(SUB):
        r = ((i_blk % NBC) * SUB + s) * BT + o_t  # rows inside the (padded) chunk
        t = i_n * CS + r
        m_t = (r < CS) & (t < L)
        p_mask = mask + i_b64 * s_mb + t * s_ml
        valid = tl.load(p_mask, mask=m_t, other=0) != 0
        p_row = i_b64 * s_xb + i_h * s_xh + t * s_xl
        b_q = _load_rows(q, taps_q, p_row, p_mask, t, m_t, s_xl, s_ml, D, CONV)
        b_k = _load_rows(k, taps_k, p_row, p_mask, t, m_t, s_xl, s_ml, D, CONV)
        b_v = _load_rows(v, taps_v, p_row, p_mask, t, m_t, s_xl, s_ml, D, CONV)
        if QK_NORM:
            b_q = b_q / tl.maximum(tl.sqrt(tl.sum(b_q * b_q, 1)), QK_EPS)[:, None]
            b_k = b_k / tl.maximum(tl.sqrt(tl.sum(b_k * b_k, 1)), QK_EPS)[:, None]
        b_beta = tl.where(valid, _load_scalars(beta, i_b64 * s_sb + i_h * s_sh + t * s_sl, m_t, CONV), 0.0)
        b_kb = b_k * b_beta[:, None]

        b_a = tl.where(o_t[:, None] > o_t[None, :], _mm(b_kb, tl.trans(b_k), PREC), 0.0)
        b_t = unit_lower_inverse(b_a, BT, LOG2_BT, PREC)
        b_tv = _mm(b_t, b_v * b_beta[:, None], PREC)
        b_tk = _mm(b_t, b_kb, PREC)
        b_qk = tl.where(o_t[:, None] >= o_t[None, :], _mm(b_q, tl.trans(b_k), PREC), 0.0)
        b_qt = b_q - _mm(b_qk, b_tk, PREC)
        b_qv = _mm(b_qk, b_tv, PREC)
        b_ktk = _mm(tl.trans(b_k), b_tk, PREC)
        b_ktv = _mm(tl.trans(b_k), b_tv, PREC)
        b_ctv = tl.sum(b_tv, 0)
        b_ctk = tl.sum(b_tk, 0)
        if s > 0:  # fold the earlier parts in
            b_qv = b_qv + _mm(b_qt, b_va, PREC)
            b_qt = b_qt - _mm(b_qt, b_ka, PREC)
            b_ctv = b_ctv - tl.sum(b_ctk[:, None] * b_va, 0)
            b_ctk = b_ctk - tl.sum(b_ctk[:, None] * b_ka, 0)
            b_va = b_va + b_ktv - _mm(b_ktk, b_va, PREC)
            b_ka = b_ka + b_ktk - _mm(b_ktk, b_ka, PREC)
        else:
            b_va = b_ktv
            b_ka = b_ktk
        b_sum_tv += b_ctv
        b_sum_tk += b_ctk
        b_sum_k += tl.sum(tl.where(valid[:, None], b_k, 0.0), 0)
        p_rows = (i_c * C + r)[:, None] * D + o_d[None, :]
        tl.store(qt + p_rows, b_qt.to(qt.dtype.element_ty))
        tl.store(qv + p_rows, b_qv.to(qv.dtype.element_ty))

    i_g = (i_b64 * HG + i_hg) * N * NBC + i_blk  # index of this (sample, head, block) in maps, vecs
    p_map = maps + i_g * 2 * D * D + o_d[:, None] * D + o_d[None, :]
    tl.store(p_map, b_ka.to(maps.dtype.element_ty))
    tl.store(p_map + D * D, b_va.to(maps.dtype.element_ty))
    p_vec = vecs + i_g * 3 * D + o_d
    tl.store(p_vec, b_sum_tv)
    tl.store(p_vec + D, b_sum_tk)
    tl.store(p_vec + 2 * D, b_sum_k)


@triton.jit
def _store_output(out, b_o, p_out, m_t, gate_out, p_gate, norm_w, eps, D: tl.constexpr, NORM: tl.constexpr):
    """Rows b_o of O into out; with NORM the layer's output side first: each row's
    RMSNorm over the head (weight norm_w) times the sigmoid of the output gate's logits, as
    delta_net_output in layers/dual_state_delta_net.py."""
    if NORM:
        scale = 1.0 / tl.sqrt(tl.sum(b_o * b_o, 1) / D + eps)
        b_w = tl.load(norm_w + tl.arange(0, D)).to(tl.float32)
        b_g = tl.sigmoid(tl.load(gate_out + p_gate, mask=m_t[:, None], other=0.0).to(tl.float32))
        b_o = b_o * scale[:, None] * b_w[None, :] * b_g
    tl.store(out + p_out, b_o.to(out.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def chunk_scan_kernel(
    qt, qv, maps, vecs, decay_fast, decay_slow, gate_fast, gate_slow, mask,
    w_bil, tau, w_hid, b_hid, w_out, b_out,
    o, kt, stats, gate_out, norm_w,
    L, N, H, CS, h0, HG, eps,  # heads as in block_prepare_kernel
    s_sb, s_sh, s_sl,  # strides of decays and gates
    s_mb, s_ml,  # strides of mask
    s_ob, s_oh, s_ol,  # strides of o (unit stride on d); of the gate's logits with NORM
    s_gb, s_gl,
    C: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
    SINGLE: tl.constexpr, PREC: tl.constexpr, CONV: tl.constexpr, NORM: tl.constexpr,
):
    """The blocks of one chunk in order (per head, chunk, sample), from block_prepare_kernel's
    results. With P_U = K^T U and P_W = K^T W over the earlier blocks of the chunk, block
    i's rows of U = T (Vb - Kb P_U) and W = T (Kb - Kb P_W) give

        A U = QT P_U + QV,   Q - A W = QT - QT P_W,
        P_U += K^T TV - (K^T TK) P_U,   P_W += K^T TK - (K^T TK) P_W,

    and the column sums of U are those of TV minus (column sums of TK) P_U. The rows
    A U and Q - A W overwrite QV and QT. At the end: psi, and for a single chunk its
    output, else what the recurrence reads. (P_U and P_W as one matrix: two products a
    block, not four.)"""
    i_hg, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = h0 + i_hg
    NBC: tl.constexpr = C // BT
    i_b64 = i_b.to(tl.int64)
    i_c = (i_b64 * H + i_h) * N + i_n  # this (sample, head, chunk): its rows start at i_c * C in qt, qv
    s_off = i_b64 * s_sb + i_h * s_sh
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    p_dd = o_d[:, None] * D + o_d[None, :]
    # P = [P_U | -P_W] as one D x W matrix (a single chunk needs P_U only), so that each
    # block takes two products instead of four: with M = [K^T TV | -K^T TK] and the rows
    # [QV | QT],  [A U | Q - A W] = QT P + [QV | QT]  and  P += M - (K^T TK) P.
    W: tl.constexpr = D if SINGLE else 2 * D
    o_w = tl.arange(0, W)
    left = o_w < D  # the P_U half
    c_w = o_w % D
    b_p = tl.zeros([D, W], dtype=tl.float32)
    b_sum_k = tl.zeros([D], dtype=tl.float32)
    b_sum_u = tl.zeros([W], dtype=tl.float32)  # column sums of U in the P_U half
    n_valid = 0.0
    sum_df = 0.0
    sum_ds = 0.0
    for j in range(NBC):
        r = j * BT + o_t
        t = i_n * CS + r
        m_t = (r < CS) & (t < L)
        valid = tl.load(mask + i_b64 * s_mb + t * s_ml, mask=m_t, other=0) != 0
        p_rows = (i_c * C + r)[:, None] * D + o_d[None, :]
        p_rows_w = (i_c * C + r)[:, None] * D + c_w[None, :]
        p_out = tl.where(left[None, :], qv + p_rows_w, qt + p_rows_w)  # [QV | QT], then [A U | Q - A W]
        i_g = ((i_b64 * HG + i_hg) * N + i_n) * NBC + j
        p_map = maps + i_g * 2 * D * D
        b_qt = tl.load(qt + p_rows).to(tl.float32)
        b_rows = tl.load(p_out).to(tl.float32)
        b_ktk = tl.load(p_map + p_dd).to(tl.float32)
        b_m = tl.load(p_map + tl.where(left, D * D, 0)[None, :] + o_d[:, None] * D + c_w[None, :]).to(tl.float32)
        b_m = tl.where(left[None, :], b_m, -b_m)
        b_ctv = tl.load(vecs + i_g * 3 * D + c_w, mask=left, other=0.0)
        b_ctk = tl.load(vecs + i_g * 3 * D + D + o_d)
        b_sum_k += tl.load(vecs + i_g * 3 * D + 2 * D + o_d)

        tl.store(p_out, (_mm(b_qt, b_p, PREC) + b_rows).to(qv.dtype.element_ty))
        b_sum_u += b_ctv - tl.sum(b_ctk[:, None] * b_p, 0)
        b_p = b_p + b_m - _mm(b_ktk, b_p, PREC)

        n_valid += tl.sum(valid.to(tl.float32), 0)
        p_s = s_off + t * s_sl
        sum_df += tl.sum(tl.where(valid, _load_scalars(decay_fast, p_s, m_t, CONV), 0.0), 0)
        sum_ds += tl.sum(tl.where(valid, _load_scalars(decay_slow, p_s, m_t, CONV), 0.0), 0)

    # <W_bil, P_U>: W_bil read into the P_U half (zeros in the other).
    b_wb = tl.load(w_bil + i_h * D * D + o_d[:, None] * D + c_w[None, :], mask=left[None, :], other=0.0).to(tl.float32)
    bilinear = tl.sum(tl.sum(b_wb * b_p, 1), 0)
    sum_u = tl.sum(tl.where(o_w[None, :] == o_d[:, None], b_sum_u[None, :], 0.0), 1)  # its P_U half
    psi = _flux_psi(bilinear, b_sum_k, sum_u, n_valid, i_h, tau, w_hid, b_hid, w_out, b_out, D)
    if SINGLE:
        # Zero states: O = (alpha g_f + (1 - alpha) g_s) A U. The A U rows were written
        # by other threads of this program: the barrier makes them visible.
        alpha = 0.5 + 0.3 * psi  # ops.common.fast_share
        tl.debug_barrier()
        for j in range(NBC):
            r = j * BT + o_t
            t = i_n * CS + r
            m_t = (r < CS) & (t < L)
            p_s = s_off + t * s_sl
            b_gf = _load_scalars(gate_fast, p_s, m_t, CONV)
            b_gs = _load_scalars(gate_slow, p_s, m_t, CONV)
            b_au = tl.load(qv + (i_c * C + r)[:, None] * D + o_d[None, :]).to(tl.float32)
            b_o = (alpha * b_gf + (1 - alpha) * b_gs)[:, None] * b_au
            p_o = i_b64 * s_ob + i_h * s_oh + t[:, None] * s_ol + o_d[None, :]
            p_g = i_b64 * s_gb + t[:, None] * s_gl + i_h * D + o_d[None, :]
            _store_output(o, b_o, p_o, m_t, gate_out, p_g, norm_w, eps, D, NORM)
    else:
        count = tl.maximum(n_valid, 1.0)
        # [K^T U | K^T W] = [P_U | P_W]
        tl.store(kt + i_c * D * 2 * D + o_d[:, None] * (2 * D) + o_w[None, :], tl.where(left[None, :], b_p, -b_p))
        tl.store(stats + i_c * 4 + 0, psi)
        # The mean decays scaled as ops.common.psi_decay_factors scales them.
        tl.store(stats + i_c * 4 + 1, sum_df / count * (1 - 0.10 * psi))
        tl.store(stats + i_c * 4 + 2, sum_ds / count * (1 - 0.05 * psi))
        tl.store(stats + i_c * 4 + 3, (n_valid > 0).to(tl.float32))


@triton.jit
def _flux_psi(bilinear, b_sum_k, b_sum_u, n_valid, i_h, tau, w_hid, b_hid, w_out, b_out, D: tl.constexpr):
    """psi = ResonanceFlux([mean K ; mean U ; mean_t k_t W_bil u_t / tau]), given the sums of
    K and U and ``bilinear`` = sum_t k_t W_bil u_t. Rows of U are zero where beta = 0, so that
    sum over valid tokens is <W_bil, K^T U>."""
    o_d = tl.arange(0, D)
    count = tl.maximum(n_valid, 1.0)
    score = bilinear / count / tl.load(tau + i_h).to(tl.float32)
    o_j = tl.arange(0, D // 2)
    p_wh = w_hid + o_j[:, None] * (2 * D + 1)
    b_z = tl.sum(tl.load(p_wh + o_d[None, :]).to(tl.float32) * (b_sum_k / count)[None, :], 1)
    b_z += tl.sum(tl.load(p_wh + D + o_d[None, :]).to(tl.float32) * (b_sum_u / count)[None, :], 1)
    b_z += tl.load(w_hid + o_j * (2 * D + 1) + 2 * D).to(tl.float32) * score
    b_z += tl.load(b_hid + o_j).to(tl.float32)
    b_hidden = b_z * tl.sigmoid(b_z)
    y = tl.sum(b_hidden * tl.load(w_out + o_j).to(tl.float32), 0) + tl.load(b_out).to(tl.float32)
    return tl.minimum(tl.maximum(tl.sigmoid(y), PSI_LOW), PSI_HIGH)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def state_recurrence_kernel(kt, stats, r_fast, r_slow, init_fast, init_slow, saved_fast, saved_slow, save_after,
                            N, H, D: tl.constexpr, PREC: tl.constexpr, CARRY: tl.constexpr):
    """Both states of one (sample, head) over its N chunks; writes the R each chunk reads.

    CARRY: the states start from init_fast, init_slow (B, H, D, D) instead of zero, and
    the states after save_after[sample] chunks (0: the initial ones) go to saved_fast,
    saved_slow (a carried state, lam_embed/state.py).

    This loop is the only sequential part of the op, so its chain of dependent steps is
    kept short: the loads of chunk n + 1 are issued before the arithmetic of chunk n,
    the norm of a decayed state is |decay| times the state's norm (known from the step
    that normalised it), and K^T W R is formed as (K^T W S) times a scalar.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, D)
    p_dd = o_d[:, None] * D + o_d[None, :]
    p_ktu = o_d[:, None] * (2 * D) + o_d[None, :]
    if CARRY:
        b_sf = tl.load(init_fast + i_bh * D * D + p_dd)
        b_ss = tl.load(init_slow + i_bh * D * D + p_dd)
        norm_f = tl.sqrt(tl.sum(tl.sum(b_sf * b_sf, 1), 0))  # Frobenius norms of b_sf, b_ss
        norm_s = tl.sqrt(tl.sum(tl.sum(b_ss * b_ss, 1), 0))
        save_n = tl.load(save_after + i_bh // H)
        if save_n == 0:
            tl.store(saved_fast + i_bh * D * D + p_dd, b_sf)
            tl.store(saved_slow + i_bh * D * D + p_dd, b_ss)
    else:
        b_sf = tl.zeros([D, D], dtype=tl.float32)
        b_ss = tl.zeros([D, D], dtype=tl.float32)
        norm_f = 0.0
        norm_s = 0.0
        save_n = -1

    i_c = i_bh * N
    b_ktu = tl.load(kt + i_c * 2 * D * D + p_ktu)
    b_ktw = tl.load(kt + i_c * 2 * D * D + p_ktu + D)
    psi = tl.load(stats + i_c * 4 + 0)
    df = tl.load(stats + i_c * 4 + 1)
    ds = tl.load(stats + i_c * 4 + 2)
    keep = tl.load(stats + i_c * 4 + 3)
    for n in range(N):
        i_c = i_bh * N + n
        i_next = i_bh * N + tl.minimum(n + 1, N - 1)
        nb_ktu = tl.load(kt + i_next * 2 * D * D + p_ktu)
        nb_ktw = tl.load(kt + i_next * 2 * D * D + p_ktu + D)
        n_psi = tl.load(stats + i_next * 4 + 0)
        n_df = tl.load(stats + i_next * 4 + 1)
        n_ds = tl.load(stats + i_next * 4 + 2)
        n_keep = tl.load(stats + i_next * 4 + 3)

        # R = S d / (||S d|| + eps) = S * scale
        scale_f = df / (tl.abs(df) * norm_f + STATE_EPS)
        scale_s = ds / (tl.abs(ds) * norm_s + STATE_EPS)
        tl.store(r_fast + i_c * D * D + p_dd, b_sf * scale_f)
        tl.store(r_slow + i_c * D * D + p_dd, b_ss * scale_s)

        b_nf = b_sf * df + (b_ktu - _mm(b_ktw, b_sf, PREC) * scale_f)
        b_ns = b_ss * ds + (b_ktu - _mm(b_ktw, b_ss, PREC) * scale_s)
        c = 0.05 + 0.1 * psi  # the coupling of ops.common.coupling_and_normalise
        b_nf = b_nf + c * psi * b_ns
        b_ns = b_ns + c * (1 - psi) * b_nf
        # Both squared norms in one reduction: one exchange between warps instead of two.
        nf, ns = tl.reduce((b_nf * b_nf, b_ns * b_ns), 1, _add_pair)
        nf, ns = tl.reduce((nf, ns), 0, _add_pair)
        nf, ns = tl.sqrt(nf), tl.sqrt(ns)
        # A chunk without valid tokens leaves the states as they were.
        if keep > 0:
            b_sf = b_nf / (nf + STATE_EPS)
            b_ss = b_ns / (ns + STATE_EPS)
            norm_f = nf / (nf + STATE_EPS)
            norm_s = ns / (ns + STATE_EPS)
        if CARRY:
            if n + 1 == save_n:
                tl.store(saved_fast + i_bh * D * D + p_dd, b_sf)
                tl.store(saved_slow + i_bh * D * D + p_dd, b_ss)

        b_ktu, b_ktw, psi, df, ds, keep = nb_ktu, nb_ktw, n_psi, n_df, n_ds, n_keep


@triton.jit
def chunk_output_kernel(
    qw, au, r_fast, r_slow, stats, gate_fast, gate_slow, o, gate_out, norm_w,
    L, N, H, CS, eps,
    s_sb, s_sh, s_sl,
    s_ob, s_oh, s_ol,
    s_gb, s_gl,
    C: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr, CONV: tl.constexpr,
    NORM: tl.constexpr,
):
    """O = alpha g_f (QW R_f + AU) + (1 - alpha) g_s (QW R_s + AU) for ROWS rows of a
    chunk, QW and AU as chunk_scan_kernel left them, into o (see _store_output for NORM).
    CONV > 0: the gates are logits (_load_scalars)."""
    i_h, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = i_m // (C // ROWS)
    i_b64 = i_b.to(tl.int64)
    i_c = (i_b64 * H + i_h) * N + i_n
    o_r = (i_m % (C // ROWS)) * ROWS + tl.arange(0, ROWS)
    o_d = tl.arange(0, D)
    t = i_n * CS + o_r
    m_t = (o_r < CS) & (t < L)

    p_dd = i_c * D * D + o_d[:, None] * D + o_d[None, :]
    b_rf = tl.load(r_fast + p_dd)
    b_rs = tl.load(r_slow + p_dd)
    alpha = 0.5 + 0.3 * tl.load(stats + i_c * 4)  # ops.common.fast_share

    p_a = (i_c * C + o_r)[:, None] * D + o_d[None, :]  # rows of chunk_scan_kernel's (B, H, N C, d) buffers
    b_qw = tl.load(qw + p_a).to(tl.float32)
    b_au = tl.load(au + p_a).to(tl.float32)
    p_s = i_b64 * s_sb + i_h * s_sh + t * s_sl
    b_gf = _load_scalars(gate_fast, p_s, m_t, CONV)
    b_gs = _load_scalars(gate_slow, p_s, m_t, CONV)

    b_of = b_gf[:, None] * (_mm(b_qw, b_rf, PREC) + b_au)
    b_os = b_gs[:, None] * (_mm(b_qw, b_rs, PREC) + b_au)
    p_o = i_b64 * s_ob + i_h * s_oh + t[:, None] * s_ol + o_d[None, :]
    p_g = i_b64 * s_gb + t[:, None] * s_gl + i_h * D + o_d[None, :]
    _store_output(o, alpha * b_of + (1 - alpha) * b_os, p_o, m_t, gate_out, p_g, norm_w, eps, D, NORM)


def flux_parameters(flux):
    """The tensors the kernel reads of a flux module that offers them through
    ``kernel_parameters()`` (the layer's ResonanceFlux: bilinear, temperature, hidden
    weight and bias, out weight and bias), or None for any other flux."""
    offer = getattr(flux, "kernel_parameters", None)
    return offer() if callable(offer) else None


def _common_layout(tensors, unit_last: bool):
    """The tensors as given when they share one set of strides (unit stride on the
    last dim if ``unit_last``), else contiguous copies: the kernels take one set."""
    strides = tensors[0].stride()
    if all(t.stride() == strides for t in tensors) and (not unit_last or strides[-1] == 1):
        return tensors
    return [t.contiguous() for t in tensors]


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """How the kernels are launched: tile sizes, warps and the precision of their products.

    The defaults are the fastest measured on an H200 (benchmarks/results/kernel-variants-h200.json,
    kernel time of a layer's token mixer); tests/test_triton.py ``--sweep`` compares variants,
    each a ``dataclasses.replace`` of the default passed as ``launch`` to the functions below.
    """

    block_t: int = 16  # rows of a triangular inverse (16 is the smallest tl.dot size; 32 and 64 were slower)
    # BT-row parts a block_prepare_kernel program folds into one block for chunk_scan_kernel
    # (2 halves the memory of the d x d products and the steps in order, but measured no
    # faster: 0.406 against 0.402 ms a layer at 64 x 512 on an H200; 4: 0.953).
    sub_blocks: int = 1
    # Products of block_prepare_kernel: for bfloat16/float16 inputs on bfloat16 operands
    # (0.14 against 0.18 ms at 64 x 512 tokens, errors still ~1% of the output scale,
    # under the 2% of the tests); "tf32x3" for float32 inputs (float32 accuracy, 1e-6
    # from chunk.py where plain tf32 gives 4e-3).
    prepare_precision: dict = dataclasses.field(default_factory=lambda: {
        torch.float32: "tf32x3", torch.bfloat16: "bf16", torch.float16: "bf16"})
    # Products of chunk_scan_kernel and chunk_output_kernel.
    precision: dict = dataclasses.field(default_factory=lambda: {
        torch.float32: "tf32x3", torch.bfloat16: "tf32", torch.float16: "tf32"})
    state_precision: str = "ieee"  # state_recurrence_kernel: as fast as "tf32x3" there, and exact float32
    # What block_prepare_kernel hands to chunk_scan_kernel (QT, QV and the d x d products):
    # the input's dtype for 16-bit inputs (half the traffic), float32 for float32 inputs.
    stage_dtype: dict = dataclasses.field(default_factory=lambda: {
        torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16})
    # block_prepare, chunk_scan, state_recurrence, chunk_output. One warp per block and per
    # chunk: 0.39 against 0.55 ms with two at 64 x 512 tokens with tf32 products (no
    # exchange between warps).
    num_warps: tuple = (1, 1, 4, 4)
    output_rows: int = 64  # rows of a chunk per program of chunk_output_kernel
    stage_bytes: int = 64 << 20  # most memory for the blocks' d x d products at once (see triton_forward)


DEFAULT_LAUNCH = LaunchSettings()


def triton_forward(q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask, flux_params, chunk_size: int,
                   qk_l2norm: bool = False, conv_taps: torch.Tensor | None = None, output_norm=None,
                   launch: LaunchSettings = DEFAULT_LAUNCH, initial_state=None, state_after_chunks=None):
    """Forward pass through the kernels. Returns O (B, H, L, d) float32, stored as (B, L, H, d).

    ``initial_state`` (S_fast, S_slow), (B, H, d, d) each, and ``state_after_chunks`` (B,)
    as in ``chunk_dual_state_delta_rule``: with the latter the result is (O, (S_fast, S_slow)),
    the states after that many chunks of each sample, float32.

    ``conv_taps`` (3 H d, K), the layer's q, k, v convolution weights, contiguous: then
    q, k, v are the projections before the convolution and SiLU, and the five per-token
    scalars are logits; the kernels apply those activations on load (see _load_rows).
    ``output_norm`` (gate_logits (B, L, H d) with unit stride on the last dim, norm_weight
    (d,), eps): the kernels then return the layer's output side instead of O,
    RMSNorm(O) * norm_weight * sigmoid(gate_logits) per head, (B, L, H d) in gate_logits' dtype.
    """
    B, H, L, D = q.shape
    N = triton.cdiv(L, chunk_size)
    carried = initial_state is not None or state_after_chunks is not None
    single = N == 1 and not carried  # zero states: no recurrence
    BT, SUB = launch.block_t, launch.sub_blocks
    BS = BT * SUB  # rows of a block of chunk_scan_kernel
    # The kernels' chunk: chunk_size rows padded to a power of two (rows past chunk_size
    # are padding); a single short chunk is cut to the input length.
    C = max(BS, triton.next_power_of_2(min(chunk_size, L)))
    NBC = C // BS
    prec = launch.precision.get(q.dtype, "ieee")
    warps = launch.num_warps
    q, k, v = _common_layout([q, k, v], unit_last=True)
    beta, decay_fast, decay_slow, gate_fast, gate_slow = _common_layout(
        [beta, decay_fast, decay_slow, gate_fast, gate_slow], unit_last=False)
    mask_u8 = mask.contiguous().view(torch.uint8)
    # The kernels convert on load: no float32 copies of the flux parameters (six small
    # kernels a layer for a bfloat16 model).
    flux_args = [p.contiguous() for p in flux_params]
    conv = 0 if conv_taps is None else conv_taps.shape[-1]
    if conv and (conv_taps.shape[0] != 3 * H * D or not conv_taps.is_contiguous()):
        raise ValueError(f"conv_taps must be a contiguous ({3 * H * D}, K) tensor, got {tuple(conv_taps.shape)}")
    taps = q if conv_taps is None else conv_taps  # not read without conv_taps

    norm = output_norm is not None
    if norm:
        gate, norm_w, eps = output_norm
        if gate.shape != (B, L, H * D) or gate.stride(-1) != 1:
            raise ValueError(f"output_norm's gate logits must be ({B}, {L}, {H * D}) with unit last stride, "
                             f"got {tuple(gate.shape)} with strides {gate.stride()}")
        out = gate.new_empty(B, L, H * D)
        o = out.view(B, L, H, D).permute(0, 2, 1, 3)
    else:
        # (B, L, H, d) in memory: the layer's next step merges the heads for free.
        o = q.new_empty(B, L, H, D, dtype=torch.float32).permute(0, 2, 1, 3)
        gate, norm_w, eps = o, o, 0.0  # not read
    if single:
        kt = stats = o  # not touched by the kernels
    else:
        kt = q.new_empty(B, H, N, D, 2 * D, dtype=torch.float32)  # [K^T U | K^T W] of each chunk
        stats = q.new_empty(B, H, N, 4, dtype=torch.float32)  # psi, effective decays, any valid token
    stage = launch.stage_dtype.get(q.dtype, torch.float32)
    qt = q.new_empty(B, H, N * C, D, dtype=stage)  # QT, then Q - A W
    qv = torch.empty_like(qt)  # QV, then A U
    # The blocks' d x d products take twice the memory of QT and QV: for a large input
    # they are made and used a group of heads at a time, in buffers of at most
    # launch.stage_bytes (the peak memory of a layer then stays under MiniLM's).
    map_bytes = B * N * NBC * 2 * D * D * qt.element_size()
    HG = triton.cdiv(H, max(1, min(H, triton.cdiv(H * map_bytes, launch.stage_bytes))))
    maps = q.new_empty(B, HG, N * NBC, 2, D, D, dtype=stage)  # K^T TK, K^T TV of each block
    vecs = q.new_empty(B, HG, N * NBC, 3, D, dtype=torch.float32)  # column sums of TV, TK, valid rows of K
    for h0 in range(0, H, HG):
        heads = min(HG, H - h0)
        block_prepare_kernel[(heads, N * NBC, B)](
            q, k, v, beta, mask_u8, qt, qv, maps, vecs, taps,
            L, N, H, chunk_size, h0, HG,
            q.stride(0), q.stride(1), q.stride(2),
            beta.stride(0), beta.stride(1), beta.stride(2),
            mask_u8.stride(0), mask_u8.stride(1),
            C=C, D=D, BT=BT, LOG2_BT=BT.bit_length() - 1, SUB=SUB, QK_NORM=qk_l2norm,
            PREC=launch.prepare_precision.get(q.dtype, "ieee"), CONV=conv, num_warps=warps[0],
        )
        chunk_scan_kernel[(heads, N, B)](
            qt, qv, maps, vecs, decay_fast, decay_slow, gate_fast, gate_slow, mask_u8,
            *flux_args, o, kt, stats, gate, norm_w,
            L, N, H, chunk_size, h0, HG, eps,
            beta.stride(0), beta.stride(1), beta.stride(2),
            mask_u8.stride(0), mask_u8.stride(1),
            o.stride(0), o.stride(1), o.stride(2),
            gate.stride(0), gate.stride(1),
            C=C, D=D, BT=BS, SINGLE=single, PREC=prec, CONV=conv, NORM=norm, num_warps=warps[1],
        )
    del maps, vecs  # free before the recurrence's buffers are made
    if not single:
        r_fast = q.new_empty(B, H, N, D, D, dtype=torch.float32)
        r_slow = torch.empty_like(r_fast)
        if carried:
            if initial_state is None:
                init_fast = init_slow = q.new_zeros(B, H, D, D, dtype=torch.float32)
            else:
                init_fast, init_slow = (s.float().contiguous() for s in initial_state)
            saved_fast, saved_slow = torch.empty_like(init_fast), torch.empty_like(init_slow)
            save_after = (state_after_chunks if state_after_chunks is not None
                          else torch.zeros(B, dtype=torch.long, device=q.device)).to(torch.int32).contiguous()
        else:
            init_fast = init_slow = saved_fast = saved_slow = save_after = kt  # not read
        state_recurrence_kernel[(B * H,)](kt, stats, r_fast, r_slow, init_fast, init_slow, saved_fast, saved_slow,
                                          save_after, N, H, D=D, PREC=launch.state_precision, CARRY=carried,
                                          num_warps=warps[2])
        rows = min(launch.output_rows, C)
        chunk_output_kernel[(H, N * (C // rows), B)](
            qt, qv, r_fast, r_slow, stats, gate_fast, gate_slow, o, gate, norm_w,
            L, N, H, chunk_size, eps,
            gate_fast.stride(0), gate_fast.stride(1), gate_fast.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            gate.stride(0), gate.stride(1),
            C=C, D=D, ROWS=rows, PREC=prec, CONV=conv, NORM=norm, num_warps=warps[3],
        )
    result = out if norm else o
    return (result, (saved_fast, saved_slow)) if state_after_chunks is not None else result


class DualStateDeltaRuleFunction(torch.autograd.Function):
    """Forward through the Triton kernels; backward through the chunked implementation.

    The backward recomputes the forward with ``chunk_dual_state_delta_rule`` under
    autograd (in float32) and backpropagates the incoming gradient through it, so the
    gradients are exactly those of delta_impl="chunk". The flux parameters are inputs
    of the function, so that autograd hands them their gradients as well.
    """

    @staticmethod
    def forward(ctx, mask, flux, chunk_size, qk_l2norm, launch, *inputs):
        tensors, flux_params = inputs[:NUM_TENSORS], inputs[NUM_TENSORS:]
        ctx.save_for_backward(*tensors)
        ctx.mask, ctx.flux, ctx.chunk_size, ctx.flux_params = mask, flux, chunk_size, flux_params
        ctx.qk_l2norm = qk_l2norm
        out = triton_forward(*tensors, mask, flux_params, chunk_size, qk_l2norm, launch=launch)
        return out if qk_l2norm else out.to(tensors[0].dtype)

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        with torch.enable_grad():
            inputs = [t.detach().float().requires_grad_(need) for t, need in zip(tensors, needs)]
            q, k = (l2norm(inputs[0]), l2norm(inputs[1])) if ctx.qk_l2norm else inputs[:2]
            out = chunk_dual_state_delta_rule(q, k, *inputs[2:], ctx.mask, ctx.flux, chunk_size=ctx.chunk_size)
            # The flux module's parameters are the ones passed to apply (see flux_parameters).
            wrt = inputs + list(ctx.flux_params)
            wrt_needed = [x for x, need in zip(wrt, needs) if need]
            grads = torch.autograd.grad(out, wrt_needed, grad_out.float(), allow_unused=True) if wrt_needed else ()
        grads = iter(grads)
        result = []
        for x, need in zip(tensors + tuple(ctx.flux_params), needs):
            g = next(grads) if need else None
            result.append(g.to(x.dtype) if g is not None else None)
        return (None, None, None, None, None, *result)


NUM_TENSORS = 8  # q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow


def triton_dual_state_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_fast: torch.Tensor,
    decay_slow: torch.Tensor,
    gate_fast: torch.Tensor,
    gate_slow: torch.Tensor,
    mask: torch.Tensor,
    flux,
    chunk_size: int = 128,
    state_dropout: float = 0.0,
    training: bool = False,
    qk_l2norm: bool = False,
    launch: LaunchSettings = DEFAULT_LAUNCH,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    state_after_chunks: torch.Tensor | None = None,
):
    """Dual-state delta rule through the fused kernels; same contract as ``chunk_dual_state_delta_rule``
    (carried states included), plus ``qk_l2norm`` (see ``lam_embed.ops.dual_state_delta_rule``).

    Returns O (B, H, L, d) in q's dtype (float32 with qk_l2norm), and the states with
    ``state_after_chunks``. The inputs may mix dtypes. Falls back to the chunked
    implementation for state dropout while training, a flux other than ResonanceFlux, a
    head size that is not a power of two of at least 16, and gradients through a carried state.
    """
    args = (q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow)
    flux_params = flux_parameters(flux)
    D = q.shape[-1]
    dtype = torch.float32 if qk_l2norm else q.dtype
    carry = {"initial_state": initial_state, "state_after_chunks": state_after_chunks}
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*args, *(flux_params or ())))
    carried = initial_state is not None or state_after_chunks is not None

    def in_dtype(out):  # O in the caller's dtype; the states stay float32
        return (out[0].to(dtype), out[1]) if state_after_chunks is not None else out.to(dtype)

    if ((training and state_dropout > 0) or flux_params is None or D < 16 or D & (D - 1)
            or (carried and needs_grad)):
        # The chunked form wants float32 inputs, q and k normalised.
        args = [t.float() for t in args]
        if qk_l2norm:
            args[:2] = l2norm(q), l2norm(k)
        return in_dtype(chunk_dual_state_delta_rule(*args, mask, flux, chunk_size=chunk_size,
                                                    state_dropout=state_dropout, training=training, **carry))
    if q.shape[2] == 0 and not carried:  # (lam_embed.ops.dual_state_delta_rule answers carried ones)
        return torch.zeros_like(q, dtype=dtype)
    if needs_grad:
        return DualStateDeltaRuleFunction.apply(mask, flux, chunk_size, qk_l2norm, launch, *args, *flux_params)
    return in_dtype(triton_forward(*args, mask, flux_params, chunk_size, qk_l2norm, launch=launch, **carry))
