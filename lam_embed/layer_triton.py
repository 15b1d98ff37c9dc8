"""Triton kernels for the elementwise parts of ``delta_net_features`` and
``delta_net_output`` and for the residual LayerNorms (modeling_lam.py), used on CUDA
when no gradient is needed.

After the input projection, the layer needs SiLU(causal depthwise convolution) of the
q, k, v columns and the sigmoid of the output-gate, beta, decay and state-gate columns.
torch.compile makes this two to four kernels, slow ones (2.0 ms of a 7.8 ms forward of
256 x 128 tokens on an H100, for all six layers); this kernel takes 1.0 ms. It reads each
projected value once (the three earlier rows of the convolution come from cache) and
writes every activation into one buffer, of which q, k, v, the output gate and the five
per-head scalars are views, q, k and v with the one set of strides the delta-rule
kernel takes. The output side (per-head RMSNorm of the delta rule's float32 output,
times the gate) is one kernel likewise (0.24 ms for six layers), and so is each residual
sum with its LayerNorm (0.31 ms for twelve, against 0.99 ms for PyTorch's add and
LayerNorm kernels). Figures: README, "Speed".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def conv_silu_sigmoid_kernel(
    p, mask, taps, out,
    R, L, s_p, s_o,
    NCONV: tl.constexpr, NSIG: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows are the flattened (sample, position) pairs of p (R x >= NCONV + NSIG, row
    stride s_p). Columns below NCONV: SiLU of the causal convolution over the rows of
    the same sample, with rows of padding (mask 0) read as zeros; the next NSIG columns:
    sigmoid. Arithmetic in float32, stored in out's dtype."""
    i_r, i_c = tl.program_id(0), tl.program_id(1)
    rows = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_r = rows < R
    rows64 = rows.to(tl.int64)
    if i_c * BLOCK_C < NCONV:  # NCONV is a multiple of BLOCK_C: a block is all conv or all sigmoid
        t = rows % L  # position inside the sample
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(K):
            shift = K - 1 - j  # tap j reads the row `shift` positions back
            ok = m_r & (t >= shift)
            ok = ok & (tl.load(mask + rows64 - shift, mask=ok, other=0) != 0)
            x = tl.load(p + (rows64 - shift)[:, None] * s_p + cols[None, :], mask=ok[:, None], other=0.0)
            w = tl.load(taps + cols * K + j)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
        y = acc * tl.sigmoid(acc)
        m = m_r[:, None] & (cols < NCONV)[None, :]
    else:
        m = m_r[:, None] & (cols < NCONV + NSIG)[None, :]
        x = tl.load(p + rows64[:, None] * s_p + cols[None, :], mask=m, other=0.0)
        y = tl.sigmoid(x.to(tl.float32))
    tl.store(out + rows64[:, None] * s_o + cols[None, :], y.to(out.dtype.element_ty), mask=m)


BLOCK_R, BLOCK_C = 64, 128


def delta_net_features_triton(x, mask, weight, bias, conv_weight, num_heads: int):
    """``modeling_lam.delta_net_features`` with the elementwise part in one Triton kernel;
    same arguments and results (no autograd)."""
    B, L, D = x.shape
    H = num_heads
    NCONV, NSIG = 3 * D, D + 5 * H  # q, k, v; output gate and the five per-head sigmoids
    # Column blocks must not straddle the conv/sigmoid boundary: the largest power of two
    # up to BLOCK_C that divides 3 * hidden size (128 at hidden size 384).
    block_c = math.gcd(NCONV, BLOCK_C)
    if block_c < 16:
        raise ValueError(f"delta_net_features_triton needs 3 * hidden size divisible by 16, got {NCONV}")
    K = conv_weight.shape[-1]
    # Padded rows need no zeroing here: the kernel reads them as zeros where it uses them.
    projected = F.linear(x, weight, bias).view(B * L, -1)
    # Rows padded to a multiple of 64 values, so that every row starts 128-byte aligned.
    out = x.new_empty(B, L, NCONV + NSIG + (-(NCONV + NSIG) % 64))
    mask_u8 = mask.contiguous().view(torch.uint8)
    taps = conv_weight.reshape(NCONV, K).contiguous()
    grid = (triton.cdiv(B * L, BLOCK_R), triton.cdiv(NCONV + NSIG, block_c))
    conv_silu_sigmoid_kernel[grid](
        projected, mask_u8, taps, out, B * L, L, projected.stride(0), out.stride(1),
        NCONV=NCONV, NSIG=NSIG, K=K, BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=4,
    )
    q, k, v = (out[..., i * D:(i + 1) * D].unflatten(-1, (H, -1)) for i in range(3))
    scalars = out[..., 4 * D:4 * D + 5 * H].unflatten(-1, (5, H)).unbind(2)
    return (q, k, v, out[..., 3 * D:4 * D], *scalars)


@triton.jit
def rms_norm_gate_kernel(o, gate, weight, out, R, s_o, s_g, s_out, eps, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[r, h] = o[r, h] / sqrt(mean(o[r, h]^2) + eps) * weight * gate[r, h] for BLOCK_R
    rows r and one head h (D values), in float32, stored in out's dtype."""
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    rows = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = i_h * D + tl.arange(0, D)
    m = (rows < R)[:, None]
    x = tl.load(o + rows[:, None] * s_o + cols[None, :], mask=m, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(weight + tl.arange(0, D)).to(tl.float32)
    g = tl.load(gate + rows[:, None] * s_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y = x * scale[:, None] * w[None, :] * g
    tl.store(out + rows[:, None] * s_out + cols[None, :], y.to(out.dtype.element_ty), mask=m)


def delta_net_output_triton(o, output_gate, norm_weight, o_weight, eps: float):
    """``modeling_lam.delta_net_output`` with the RMSNorm and gate in one Triton kernel;
    same arguments and result (no autograd)."""
    B, L, H, d = o.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"delta_net_output_triton needs a head size that is a power of two >= 16, got {d}")
    o = o.reshape(B * L, H * d)  # a view for the delta rule's (B, L, H, d) layout
    gate = output_gate.reshape(B * L, H * d)
    if o.stride(-1) != 1 or gate.stride(-1) != 1:
        o, gate = o.contiguous(), gate.contiguous()
    gated = gate.new_empty(B * L, H * d)
    block_r = 64
    rms_norm_gate_kernel[(triton.cdiv(B * L, block_r), H)](
        o, gate, norm_weight.contiguous(), gated, B * L, o.stride(0), gate.stride(0), gated.stride(0), eps,
        D=d, BLOCK_R=block_r, num_warps=4,
    )
    return F.linear(gated.view(B, L, H * d), o_weight)


@triton.jit
def residual_layer_norm_kernel(x, y, weight, bias, out, R, N, eps, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = LayerNorm(x + y) over rows of N values (contiguous), in float32."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    m_c = cols < N
    m = (rows < R)[:, None] & m_c[None, :]
    p = rows[:, None] * N + cols[None, :]
    a = tl.load(x + p, mask=m, other=0.0).to(tl.float32) + tl.load(y + p, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(a, 1) / N
    diff = tl.where(m, a - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / N + eps)
    w = tl.load(weight + cols, mask=m_c, other=0.0).to(tl.float32)
    b = tl.load(bias + cols, mask=m_c, other=0.0).to(tl.float32)
    tl.store(out + p, (diff * rstd[:, None] * w[None, :] + b[None, :]).to(out.dtype.element_ty), mask=m)


def residual_layer_norm(x, y, weight, bias, eps: float):
    """F.layer_norm(x + y) over the last dim in one kernel (the sum is not rounded to x's
    dtype first); no autograd."""
    x, y = x.contiguous(), y.contiguous()
    N = x.shape[-1]
    out = torch.empty_like(x)
    block_r = 16
    residual_layer_norm_kernel[(triton.cdiv(x.numel() // N, block_r),)](
        x, y, weight, bias, out, x.numel() // N, N, eps, BLOCK_R=block_r, BLOCK_N=triton.next_power_of_2(N), num_warps=4,
    )
    return out
