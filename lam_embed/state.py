"""What a LAM forward carries from one piece of a document to the next.

After the complete chunks of its input, everything a layer knows about the tokens so far is
in its two d x d states per head and in the last ``conv_size - 1`` rows of its q, k, v
projection (the causal convolution reads them). A continuation starts at a chunk boundary:
within a chunk every token's output depends on the whole chunk (psi and the decays are chunk
means), so the tokens of an incomplete last chunk are given again with the next piece
(``lam_embed.streaming`` does this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerState:
    """One layer's carried state: ``fast`` and ``slow`` (B, H, d, d) float32, and
    ``conv_tail`` (B, conv_size - 1, 3 hidden_size), the q, k, v projection rows before the
    convolution of the last positions before the boundary."""

    fast: torch.Tensor
    slow: torch.Tensor
    conv_tail: torch.Tensor


@dataclass
class LAMState:
    """Every layer's state and, per sample, the tokens read so far (``offset`` (B,), a
    multiple of the chunk size: the position of the next token)."""

    layers: list[LayerState]
    offset: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    def check(self, config, batch_size: int, device: torch.device) -> None:
        """Raise ValueError naming what does not fit a model of ``config`` and this input."""
        H, d, D = config.num_attention_heads, config.head_dim, config.hidden_size
        if len(self.layers) != config.num_hidden_layers:
            raise ValueError(f"past_state has {len(self.layers)} layers, the model {config.num_hidden_layers}")
        if self.batch_size != batch_size:
            raise ValueError(f"past_state holds {self.batch_size} documents, input_ids {batch_size}")
        if bool((self.offset % config.chunk_size != 0).any()):
            raise ValueError(f"past_state.offset must be a multiple of chunk_size {config.chunk_size}, "
                             f"got {self.offset.tolist()}")
        for i, layer in enumerate(self.layers):
            shapes = (tuple(layer.fast.shape), tuple(layer.slow.shape), tuple(layer.conv_tail.shape))
            want = ((batch_size, H, d, d), (batch_size, H, d, d), (batch_size, config.conv_size - 1, 3 * D))
            if shapes != want:
                raise ValueError(f"past_state layer {i}: shapes {shapes}, expected {want} for this model")
            if layer.fast.device != device:
                raise ValueError(f"past_state is on {layer.fast.device}, input_ids on {device}")

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (for safetensors)."""
        out = {"offset": self.offset}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.fast": layer.fast, f"layers.{i}.slow": layer.slow,
                        f"layers.{i}.conv_tail": layer.conv_tail})
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> LAMState:
        count = sum(1 for name in tensors if name.endswith(".fast"))
        try:
            layers = [LayerState(tensors[f"layers.{i}.fast"], tensors[f"layers.{i}.slow"],
                                 tensors[f"layers.{i}.conv_tail"]) for i in range(count)]
            return cls(layers, tensors["offset"])
        except KeyError as err:
            raise ValueError(f"a saved LAM state lacks the tensor {err.args[0]}") from None
