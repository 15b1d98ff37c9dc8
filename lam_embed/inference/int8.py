"""int8 matrix products for float32 inference on CPU (``LAMConfig.cpu_int8``).

``int8_linear`` computes ``F.linear(x, weight, bias)`` in oneDNN's int8 kernels (uint8
activations times int8 weights, int32 sums), those torch's x86 quantisation backend runs;
LAM's layer stacks its input projections into one matrix, so it calls them itself. Three
choices keep the embeddings close to float32's, each measured on STS-B dev sentences
(docs/performance.md):

- A scale per token. Each row of x is divided by its largest magnitude and written as uint8
  levels (a numba pass), the kernel takes them with a fixed scale and zero point, and the
  product's rows are multiplied back. A few tokens ([CLS] most) carry activations several
  times larger than the rest; with one scale for the whole batch, as dynamic quantisation
  picks it, the other rows kept a handful of levels and a sentence's embedding depended on
  the batch it came in. With fixed parameters a row's result does not depend on the other
  rows at all.
- Weights in [-127, 127] per output row where the kernels sum uint8 x int8 products in
  int32 (VNNI), in [-63, 63] where they add them in pairs into int16 (CPUs without VNNI),
  which saturates when both are large: with 7-bit weights no pair reaches the limit.
  ``weight_levels()`` asks the kernel which it does; either way it equals an exact
  simulation of the quantisation. On the released model the 8-bit weights keep every STS-B
  test sentence's embedding at a cosine of 0.99 or more with float32's (7-bit: 0.989).
- Smoothing (SmoothQuant, alpha 0.5): where the typical size of each input channel follows
  from the weights before the product (a LayerNorm's, the FFN's first product's, the
  per-head RMSNorm's), channel j is divided by s_j and the weight's column multiplied by it,
  s_j = sqrt(channel size / largest |weight| in the column), so that a few outlier channels
  do not set every row's scale.

Between the FFN's two products one numba pass scales the rows back, adds the bias, applies
GELU and writes the next product's levels (``int8_feed_forward``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

# Symmetric weight levels: where the kernel's int16 pair sums would saturate, and where they cannot.
WEIGHT_LEVELS_SUMMED_IN_PAIRS, WEIGHT_LEVELS_EXACT = 63, 127
# uint8 levels of a row scaled to [-1, 1]: round(127 x) + 128.
INPUT_SCALE, INPUT_ZERO_POINT = 1 / 127, 128
SMOOTHING_ALPHA = 0.5
# A LayerNorm output or a pre-activation reaches about this many of its standard deviations.
TYPICAL_DEVIATIONS = 4.0
_TINY = torch.finfo(torch.float32).tiny


class Int8Linear(NamedTuple):
    """A linear layer prepared for ``int8_linear`` by ``pack_linear``."""

    weight: torch.Tensor  # int8 levels, in oneDNN's packed layout
    weight_scale: torch.Tensor  # (out,) float32: a weight is its level times its row's scale
    weight_zero_point: torch.Tensor  # (out,) int32 zeros: symmetric levels
    bias: torch.Tensor | None  # (out,) float32
    inverse_smoothing: torch.Tensor | None  # (in,): 1 / s_j, what each input channel is multiplied by


@functools.cache
def supported() -> bool:
    """Whether this torch runs oneDNN's int8 products (x86 builds do)."""
    try:
        levels = torch.full((1, 4), INPUT_ZERO_POINT, dtype=torch.uint8)
        _product(levels, pack_linear(torch.ones(2, 4), levels=WEIGHT_LEVELS_SUMMED_IN_PAIRS))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@functools.cache
def weight_levels() -> int:
    """WEIGHT_LEVELS_EXACT where this CPU's int8 kernel sums 8-bit products exactly,
    WEIGHT_LEVELS_SUMMED_IN_PAIRS where a pair of the largest products saturates (int16)."""
    columns = 64
    largest = torch.full((1, columns), 255, dtype=torch.uint8)  # 127 above the zero point
    packed = pack_linear(torch.ones(1, columns), levels=WEIGHT_LEVELS_EXACT)
    exact = columns * 127 * INPUT_SCALE  # the weights' scale is 1 / 127
    saturated = abs(_product(largest, packed).item() - exact) > 0.5  # saturated pair sums leave about 0.5
    return WEIGHT_LEVELS_SUMMED_IN_PAIRS if saturated else WEIGHT_LEVELS_EXACT


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None, levels: int | None = None) -> Int8Linear:
    """``weight`` (out, in) and ``bias`` (out,) or None, prepared for ``int8_linear``.
    ``input_scale`` (in,): the typical size of each input channel, for smoothing.
    ``levels``: the weights are rounded to [-levels, levels]; default: ``weight_levels()``."""
    levels = levels or weight_levels()
    weight = weight.detach().float()
    inverse_smoothing = None
    if input_scale is not None:
        column = weight.abs().amax(0).clamp(min=1e-5)
        smoothing = (input_scale.detach().float().clamp(min=1e-5) ** SMOOTHING_ALPHA
                     / column ** (1 - SMOOTHING_ALPHA)).clamp(min=1e-5)
        weight, inverse_smoothing = weight * smoothing, 1 / smoothing
    scale = (weight.abs().amax(1) / levels).clamp(min=_TINY)
    rounded = torch.round(weight / scale[:, None]).clamp(-levels, levels).to(torch.int8)
    return Int8Linear(torch.ops.onednn.qlinear_prepack(rounded, None), scale,
                      torch.zeros(len(scale), dtype=torch.int32), None if bias is None else bias.detach().float(),
                      inverse_smoothing)


def _product(levels: torch.Tensor, packed: Int8Linear) -> torch.Tensor:
    """(levels - 128) times the weight's levels and scales, float32, without bias and row scales."""
    return torch.ops.onednn.qlinear_pointwise(levels, INPUT_SCALE, INPUT_ZERO_POINT, packed.weight,
                                              packed.weight_scale, packed.weight_zero_point, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def _levels(x: torch.Tensor, packed: Int8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x (..., in), smoothed for ``packed``, as uint8 levels and their magnitudes."""
    from ..ops import numba as kernels  # loaded already: the int8 products run with the numba layer code only

    return kernels.rows_to_levels(x.reshape(-1, x.shape[-1]), packed.inverse_smoothing)


def _scaled_product(levels: torch.Tensor, magnitude: torch.Tensor, packed: Int8Linear,
                    shape: torch.Size) -> torch.Tensor:
    """``packed``'s product of the levels, rows scaled back and bias added, in ``shape``'s leading dimensions."""
    from ..ops import numba as kernels

    y = kernels.scale_rows(_product(levels, packed), magnitude, packed.bias)
    return y.reshape(*shape[:-1], y.shape[-1])


def int8_linear(x: torch.Tensor, packed: Int8Linear) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (..., in) float32 on CPU, with ``packed`` from
    ``pack_linear(weight, bias, ...)``, computed in int8 with a scale per row of x. The
    scaling before and after the kernel is a numba pass each (lam_embed/ops/numba.py)."""
    return _scaled_product(*_levels(x, packed), packed, x.shape)


def int8_feed_forward(h: torch.Tensor, inner: Int8Linear, outer: Int8Linear, activation,
                      exact_gelu: bool) -> torch.Tensor:
    """``outer(activation(inner(h)))`` with both products in int8 (``pack_feed_forward``).
    ``exact_gelu``: the activation is erf's GELU, which the pass between the products
    computes (to 3e-7 of erf) while it scales the rows back and writes the next levels."""
    from ..ops import numba as kernels

    if not exact_gelu:
        return int8_linear(activation(int8_linear(h, inner)), outer)
    levels, magnitude = _levels(h, inner)
    levels, magnitude = kernels.gelu_rows_to_levels(_product(levels, inner), magnitude, inner.bias,
                                                    outer.inverse_smoothing)
    return _scaled_product(levels, magnitude, outer, h.shape)


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
