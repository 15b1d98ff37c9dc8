"""The Triton kernels (CUDA only): the fused dual-state delta rule (delta_rule.py) and the
layer code around it at inference (layer.py). Importing this package raises ImportError
where triton is not installed."""

from . import layer
from .delta_rule import (
    DEFAULT_LAUNCH,
    LaunchSettings,
    triton_dual_state_delta_rule,
    triton_forward,
)

__all__ = ["DEFAULT_LAUNCH", "LaunchSettings", "layer", "triton_dual_state_delta_rule", "triton_forward"]
