"""The layer code around the delta rule (layers/dual_state_delta_net.py) for CUDA inference with
the "triton" backend: no autograd.

After the input projection, the layer needs SiLU(causal depthwise convolution) of the
q, k, v columns and the sigmoid of the output-gate, beta, decay and state-gate columns.
torch.compile makes this two to four slow kernels (2.0 ms of a 7.8 ms forward of 256 x
128 tokens on an H100, for all six layers); a Triton kernel of its own took 1.0 ms.
``delta_rule_from_projection`` does without it: the delta-rule kernels read the
projection and apply the convolution and activations as they load it, so the activations
never go through memory. ``delta_net_from_projection`` goes on to the output side:
the kernel that writes the delta rule's output applies the per-head RMSNorm and the
sigmoid of the gate's logits first (a kernel of its own took 0.23 ms for six layers on
an H100, and a float32 output went to memory and back). Each residual sum with its
LayerNorm is one kernel too (0.31 ms for twelve, against 0.98 ms for PyTorch's add and
LayerNorm kernels). Figures: README, "Speed".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..common import PROJECTION_SCALARS, projection_columns
from .delta_rule import DEFAULT_LAUNCH, LaunchSettings, flux_parameters, triton_forward


def _from_projection(projected, mask, conv_weight, flux, num_heads: int, chunk_size: int, output_norm=None,
                     launch: LaunchSettings = DEFAULT_LAUNCH):
    """triton_forward on the q, k, v and scalar columns of the projection (see below)."""
    L = projected.shape[1]
    D, H = conv_weight.shape[0] // 3, num_heads
    flux_params = flux_parameters(flux)
    if flux_params is None:
        raise ValueError(f"the Triton layer code needs a ResonanceFlux as flux, got {type(flux).__name__}")
    columns = projection_columns(D, H)
    q, k, v = (projected[..., columns[name]].unflatten(-1, (H, -1)).transpose(1, 2) for name in ("q", "k", "v"))
    # beta, the two decays and the two state gates: (B, H, L) views of their logits.
    scalars = [projected[..., columns[name]].transpose(1, 2) for name in PROJECTION_SCALARS]
    taps = conv_weight.reshape(3 * D, -1).contiguous()
    # As dual_state_delta_rule: an input of at most one chunk is one chunk of its own length.
    return triton_forward(q, k, v, *scalars, mask, flux_params, min(chunk_size, L), qk_l2norm=True, conv_taps=taps,
                          output_norm=output_norm, launch=launch)


def delta_rule_from_projection(projected, mask, conv_weight, flux, num_heads: int, chunk_size: int,
                               launch: LaunchSettings = DEFAULT_LAUNCH):
    """The delta rule of a DualStateDeltaNet straight from its input projection
    (``x W + b``, see ``DualStateDeltaNet.input_projection``; columns as
    ``ops.common.projection_columns``): the convolution, SiLU and sigmoids of
    ``delta_net_features`` run inside the delta-rule kernels, which read rows of padding
    as zeros, as delta_net_features makes them. Returns O (B, H, L, d) float32, as
    ``dual_state_delta_rule(..., qk_l2norm=True)`` gives it for those features. No
    autograd; flux must be a ResonanceFlux."""
    B, L, _ = projected.shape
    if L == 0:
        D = conv_weight.shape[0] // 3
        return projected.new_zeros(B, num_heads, 0, D // num_heads, dtype=torch.float32)
    return _from_projection(projected, mask, conv_weight, flux, num_heads, chunk_size, launch=launch)


def delta_net_from_projection(projected, mask, conv_weight, flux, norm_weight, o_weight, eps: float,
                              num_heads: int, chunk_size: int, launch: LaunchSettings = DEFAULT_LAUNCH):
    """The whole token mixer from its input projection: ``delta_net_output`` of
    ``delta_rule_from_projection``, with the per-head RMSNorm and the output gate applied
    by the delta-rule kernels as they write O (no float32 O in memory). (B, L, D) in the
    projection's dtype; no autograd."""
    B, L, _ = projected.shape
    D = conv_weight.shape[0] // 3
    if L == 0:
        return projected.new_zeros(B, 0, o_weight.shape[0])
    gate_logits = projected[..., projection_columns(D, num_heads)["output_gate"]]
    gated = _from_projection(projected, mask, conv_weight, flux, num_heads, chunk_size,
                             output_norm=(gate_logits, norm_weight, eps), launch=launch)
    return F.linear(gated, o_weight)


@triton.jit
def _store_layer_norm(a, p_out, m, cols, m_c, weight, bias, N, eps):
    """LayerNorm of the float32 rows a (N values each; entries outside mask m ignored) with
    weight and bias, stored at p_out in its dtype."""
    mean = tl.sum(a, 1) / N
    diff = tl.where(m, a - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / N + eps)
    w = tl.load(weight + cols, mask=m_c, other=0.0).to(tl.float32)
    b = tl.load(bias + cols, mask=m_c, other=0.0).to(tl.float32)
    tl.store(p_out, (diff * rstd[:, None] * w[None, :] + b[None, :]).to(p_out.dtype.element_ty), mask=m)


@triton.jit
def residual_layer_norm_kernel(x, y, weight, bias, out, R, N, eps, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = LayerNorm(x + y) over rows of N values (contiguous), in float32."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    m_c = cols < N
    m = (rows < R)[:, None] & m_c[None, :]
    p = rows[:, None] * N + cols[None, :]
    a = tl.load(x + p, mask=m, other=0.0).to(tl.float32) + tl.load(y + p, mask=m, other=0.0).to(tl.float32)
    _store_layer_norm(a, out + p, m, cols, m_c, weight, bias, N, eps)


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


@triton.jit
def embedding_layer_norm_kernel(ids, types, word, position, token_type, weight, bias, out, R, L, N, V, P, T, eps,
                                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WRAP: tl.constexpr):
    """out = LayerNorm(word[id] + position[p] + token_type[type]) for rows of N values, p = t mod P
    (WRAP) or min(t, P - 1); ids and types are clamped to their tables (see LAMModel._encode)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    m_r = rows < R
    m_c = cols < N
    m = m_r[:, None] & m_c[None, :]
    i_w = tl.minimum(tl.maximum(tl.load(ids + rows, mask=m_r, other=0).to(tl.int64), 0), V - 1)
    i_t = tl.minimum(tl.maximum(tl.load(types + rows, mask=m_r, other=0).to(tl.int64), 0), T - 1)
    if WRAP:
        i_p = (rows % L) % P
    else:
        i_p = tl.minimum(rows % L, P - 1)
    a = tl.load(word + i_w[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
    a += tl.load(position + i_p[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
    a += tl.load(token_type + i_t[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
    _store_layer_norm(a, out + rows[:, None] * N + cols[None, :], m, cols, m_c, weight, bias, N, eps)


def embedding_layer_norm(input_ids, token_type_ids, word, position, token_type, weight, bias, eps: float,
                         wrap_positions: bool = True):
    """BERT's embeddings at inference in one kernel (LAMEmbeddings.forward with ids and types
    clamped to their tables, positions past the table read cyclically, or as its last row
    without ``wrap_positions``; the sum is not rounded to the
    tables' dtype before the LayerNorm). Replaces ten kernels: two clamps, the position
    index, three lookups, two sums and the LayerNorm. No autograd."""
    B, L = input_ids.shape
    N = word.shape[1]
    out = word.new_empty(B, L, N)
    if not out.numel():
        return out
    block_r = 16
    embedding_layer_norm_kernel[(triton.cdiv(B * L, block_r),)](
        input_ids.contiguous(), token_type_ids.contiguous(), word.contiguous(), position.contiguous(),
        token_type.contiguous(), weight, bias, out, B * L, L, N, word.shape[0], position.shape[0], token_type.shape[0],
        eps, BLOCK_R=block_r, BLOCK_N=triton.next_power_of_2(N), WRAP=wrap_positions, num_warps=4,
    )
    return out
