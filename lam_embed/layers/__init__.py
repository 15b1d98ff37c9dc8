"""The layers of LAM that are not BERT's."""

from .dual_state_delta_net import (
    CausalDepthwiseConv,
    DualStateDeltaNet,
    ResonanceFlux,
    causal_depthwise_conv,
    delta_net_features,
    delta_net_output,
)

__all__ = [
    "CausalDepthwiseConv",
    "DualStateDeltaNet",
    "ResonanceFlux",
    "causal_depthwise_conv",
    "delta_net_features",
    "delta_net_output",
]
