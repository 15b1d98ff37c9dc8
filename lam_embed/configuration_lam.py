"""Configuration of the LAM encoder."""

from __future__ import annotations

from transformers import PretrainedConfig

DELTA_IMPLS = ("auto", "naive", "chunk", "compiled", "triton")


class LAMConfig(PretrainedConfig):
    """Configuration of a LAM encoder: a BERT encoder whose self-attention is a
    dual-state DeltaNet layer (see docs/SPEC.md).

    The BERT fields keep BERT's names and meanings so that a BERT teacher's
    weights map onto LAM one to one, except ``position_table_size`` (BERT's
    ``max_position_embeddings``): it is only the size of the position table, not a
    length limit, since positions past it wrap around (see LAMEmbeddings).
    The DeltaNet fields:

    Args:
        chunk_size: positions per chunk of the chunked delta rule (C in docs/SPEC.md).
        conv_size: kernel size of the causal depthwise convolutions on q, k, v.
        fast_decay_init / slow_decay_init: initial sigmoid of the decay biases.
        state_dropout: dropout on each chunk's state update while training (0 = off).
        rms_norm_eps: epsilon of the gated RMSNorm on each head's output.
        delta_impl: implementation of the dual-state delta rule: "naive" (token
            loop, the reference), "chunk" (chunked form), "compiled" (chunk form
            under torch.compile), "triton" (fused kernel, CUDA only) or "auto"
            (the fastest available for the input's device).
        cuda_graphs: at inference on CUDA through the Triton kernels, replay each input
            shape's forward as a CUDA graph (lam_embed/cuda_graphs.py) instead of
            launching its kernels one by one from Python.
    """

    model_type = "lam"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 384,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 12,
        intermediate_size: int = 1536,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        position_table_size: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        chunk_size: int = 128,
        conv_size: int = 4,
        fast_decay_init: float = 0.3,
        slow_decay_init: float = 0.85,
        state_dropout: float = 0.0,
        rms_norm_eps: float = 1e-6,
        delta_impl: str = "auto",
        cuda_graphs: bool = True,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.position_table_size = position_table_size
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.chunk_size = chunk_size
        self.conv_size = conv_size
        self.fast_decay_init = fast_decay_init
        self.slow_decay_init = slow_decay_init
        self.state_dropout = state_dropout
        self.rms_norm_eps = rms_norm_eps
        self.delta_impl = delta_impl
        self.cuda_graphs = cuda_graphs
        self.validate_lam()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_lam(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "position_table_size", "type_vocab_size",
            "chunk_size", "conv_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LAMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LAMConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim < 2:
            raise ValueError(f"LAMConfig: head size hidden_size/num_attention_heads must be >= 2, got {self.head_dim}")
        for name in ("fast_decay_init", "slow_decay_init"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"LAMConfig.{name} must lie strictly between 0 and 1, got {value!r}")
        for name in ("state_dropout", "hidden_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"LAMConfig.{name} must lie in [0, 1), got {value!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"LAMConfig.cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.delta_impl not in DELTA_IMPLS:
            raise ValueError(f"LAMConfig.delta_impl must be one of {DELTA_IMPLS}, got {self.delta_impl!r}")
