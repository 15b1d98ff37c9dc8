"""int8 matrix products for float32 inference on CPU (``LAMConfig.cpu_int8``).

``int8_linear`` computes ``F.linear(x, weight, bias)`` in fbgemm's int8 kernels (uint8
activations times int8 weights, int32 sums), the kernels behind
``torch.ao.quantization.quantize_dynamic``; LAM's layer stacks its input projections into one
matrix, so it calls them itself. Three choices keep the embeddings close to float32's, each
measured on STS-B dev sentences (docs/performance.md):

- A scale per token. Each row of x is divided by its largest magnitude (a numba pass), the
  kernel quantises [-1, 1] to uint8 with a fixed scale, and the product's rows are multiplied
  back. A few tokens ([CLS] most) carry activations several times larger than the rest;
  with one scale for the whole batch, as dynamic quantisation picks it, the other rows kept a
  handful of levels and a sentence's embedding depended on the batch it came in. With fixed
  parameters a row's result does not depend on the other rows at all.
- Weights in [-63, 63] per output row. On CPUs without VNNI the kernels multiply uint8 by
  int8 in pairs summed into int16, which saturates when both are large; with 7-bit weights
  no pair reaches the limit, and the kernel equals an exact simulation of the quantisation.
- Smoothing (SmoothQuant, alpha 0.5): where the typical size of each input channel follows
  from the weights before the product (a LayerNorm's, the FFN's first product's, the
  per-head RMSNorm's), channel j is divided by s_j and the weight's column multiplied by it,
  s_j = sqrt(channel size / largest |weight| in the column), so that a few outlier channels
  do not set every row's scale.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

WEIGHT_LEVELS = 63
SMOOTHING_ALPHA = 0.5
# A LayerNorm output or a pre-activation reaches about this many of its standard deviations.
TYPICAL_DEVIATIONS = 4.0
_TINY = torch.finfo(torch.float32).tiny


def supported() -> bool:
    """Whether this torch has the fbgemm int8 kernels (x86 builds do; ARM builds do not)."""
    try:
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    except (AttributeError, RuntimeError):
        return False
    return bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> tuple:
    """``weight`` (out, in) and ``bias`` (out,) or None, prepared for ``int8_linear``.
    ``input_scale`` (in,): the typical size of each input channel, for smoothing."""
    weight = weight.detach().float()
    inverse_smoothing = None
    if input_scale is not None:
        column = weight.abs().amax(0).clamp(min=1e-5)
        smoothing = (input_scale.detach().float().clamp(min=1e-5) ** SMOOTHING_ALPHA
                     / column ** (1 - SMOOTHING_ALPHA)).clamp(min=1e-5)
        weight, inverse_smoothing = weight * smoothing, 1 / smoothing
    scale = (weight.abs().amax(1) / WEIGHT_LEVELS).clamp(min=_TINY).double()
    with warnings.catch_warnings():
        # torch marks the quantized tensor types deprecated; the fbgemm kernels they feed
        # are the only int8 products torch runs fast on CPU (torch._int_mm is 30x slower here).
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_channel(weight, scale, torch.zeros(len(scale), dtype=torch.long), 0,
                                               torch.qint8)
        packed = torch.ops.quantized.linear_prepack(quantized, None)
    return packed, None if bias is None else bias.detach().float(), inverse_smoothing


def int8_linear(x: torch.Tensor, packed: tuple) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., in) float32 on CPU, with ``packed`` from
    ``pack_linear(weight, bias, ...)``, computed in int8 with a scale per row of x. The
    scaling before and after the kernel is a numba pass each (lam_embed/ops/numba.py)."""
    from ..ops import numba as kernels  # loaded already: the int8 products run with the numba layer code only

    weight, bias, inverse_smoothing = packed
    rows, magnitude = kernels.rows_to_unit(x.reshape(-1, x.shape[-1]), inverse_smoothing)
    product = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, 1 / 127, 128, weight)
    y = kernels.scale_rows(product, magnitude, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def layer_norm_scale(norm: nn.LayerNorm) -> torch.Tensor:
    """Typical size of each channel of a LayerNorm's output: |gamma| deviations around beta."""
    return TYPICAL_DEVIATIONS * norm.weight.detach().float().abs() + norm.bias.detach().float().abs()


def pack_feed_forward(norm: nn.LayerNorm, ffn_in: nn.Linear, ffn_out: nn.Linear) -> tuple:
    """``ffn_in`` and ``ffn_out`` packed for ``int8_linear``, smoothed for an FFN whose input
    is ``norm``'s output: the first product's input channels as ``layer_norm_scale`` says, the
    second's from the pre-activation of each hidden unit, |mean| plus TYPICAL_DEVIATIONS
    deviations for a normalised input of unit variance."""
    gamma, beta = norm.weight.detach().float(), norm.bias.detach().float()
    w_in = ffn_in.weight.detach().float()
    mean = w_in @ beta + (0 if ffn_in.bias is None else ffn_in.bias.detach().float())
    deviation = (w_in * gamma).norm(dim=1)
    return (pack_linear(ffn_in.weight, ffn_in.bias, input_scale=layer_norm_scale(norm)),
            pack_linear(ffn_out.weight, ffn_out.bias, input_scale=mean.abs() + TYPICAL_DEVIATIONS * deviation))
