"""Configuration of the LAM encoder."""

from __future__ import annotations

from transformers import PretrainedConfig

from .backends import BACKEND_NAMES

POSITION_OVERFLOW = ("wrap", "clamp")


# Fields that change only how the last hidden state is pooled, not what the weights compute:
# a release may change them without training (lam_embed.release.set_release_pooling).
POOLING_FIELDS = ("token_repeat_cap", "outlier_pooling_temperature", "outlier_pooling_min_tokens")


class LAMConfig(PretrainedConfig):
    """Configuration of a LAM encoder: a BERT encoder whose self-attention is a
    dual-state DeltaNet layer (see docs/SPEC.md).

    The BERT fields keep BERT's names and meanings so that a BERT teacher's
    weights map onto LAM one to one, except ``position_table_size`` (BERT's
    ``max_position_embeddings``): it is only the size of the position table, not a
    length limit: positions past it read the table as ``position_overflow`` says.
    The DeltaNet fields:

    Args:
        position_overflow: how a position at or past position_table_size reads the
            table: "wrap" (row p mod position_table_size) or "clamp" (the last row). The
            token mixer is recurrent, so order is still seen either way.
        token_repeat_cap: None (plain outputs) or a positive count: in the last hidden state,
            the rows of a token id that occurs more than this many times in a sample are
            scaled by cap / occurrences, and every valid row then by valid tokens / summed
            weights, so that sentence-transformers' mean pooling gives a weighted mean in
            which no token id weighs more than ``token_repeat_cap`` occurrences. A long
            document repeats its frequent tokens thousands of times; without the cap their
            mean drowns a line that occurs once. Samples whose ids repeat at most cap times
            are unchanged. Only the plain forward applies it (not a forward that carries a
            state; streaming applies it over the whole document), and ``hidden_states``
            stay unweighted.
        token_weights_min_tokens: None (off) or a token count: samples with more valid
            tokens than this weigh each row in mean pooling also by the model's
            ``token_weights`` (one weight per token id, a buffer saved with the weights;
            ``lam_embed.token_weights`` computes it from a corpus), on top of the repeat cap
            and in the same way (rows scaled, then renormalised). Rare ids then weigh more
            than frequent ones in a long document, where the one line that sets it apart
            is otherwise averaged away; shorter samples are unchanged. The weights fade in:
            weight ** s with s = log(n / min_tokens) / log(4) for a sample of n tokens,
            clipped to [0, 1], in full from 4 * min_tokens on. Only the plain forward
            applies it; streaming keeps a document's rows to give the same vector.
        outlier_pooling_temperature: None (off) or a temperature t > 0: in samples of more
            than ``outlier_pooling_min_tokens`` valid tokens, each row's pooling weight (after
            the cap and the token weights) is also multiplied by exp(-t * cos(row, m)), m the
            sample's weighted mean row, and the rows renormalised as for the cap. Rows far
            from what the document says on the whole (the one line about something else)
            then weigh more than the thousands that agree with it, which a mean averages the
            line away under. The factor fades in as the token weights do: t * s, s =
            log(n / min_tokens) / log(4) clipped to [0, 1]. Shorter samples are unchanged.
            Only the plain forward applies it; streaming keeps a document's rows to give the
            same vector (the mean of the whole document must be known before any row is
            weighted).
        outlier_pooling_min_tokens: the length above which ``outlier_pooling_temperature``
            applies (in full from 4 times this on).
        pooling_gate_min_tokens: None (off) or a token count: the model has a learned
            ``pooling_gate`` (a linear map of a last hidden row to one logit g, saved with the
            weights, zero when added so that nothing changes until it is trained), and in
            samples of more valid tokens than this each row's pooling weight (after the cap,
            the token weights and the outlier factor) is also multiplied by exp(s * g(row)),
            s faded in as for the token weights (in full from 4 times this on). Training
            decides which rows of a long document weigh, where the outlier factor is a fixed
            guess. Shorter samples are unchanged.
        long_input_min_tokens: None (one set of layers) or a token count: samples of more
            valid tokens than this are read by a second set of layers, ``long_input_layers``
            (of the same shape, saved with the weights), the others by ``layers``. The long-
            document stage then moves only the layers that read documents, and short texts keep
            the embeddings of the model it started from exactly (docs/long-documents.md,
            "Separate layers for long inputs"). A batch of both kinds runs each set on its
            samples. A forward that carries a state runs the long-input layers; streaming
            reads a document of at most this many tokens in one plain forward instead.
        chunk_size: positions per chunk of the chunked delta rule (C in docs/SPEC.md).
        conv_size: kernel size of the causal depthwise convolutions on q, k, v.
        fast_decay_init / slow_decay_init: initial sigmoid of the decay biases.
        state_dropout: dropout on each chunk's state update while training (0 = off).
        rms_norm_eps: epsilon of the gated RMSNorm on each head's output.
        delta_impl: the backend (lam_embed/backends.py): "naive" (token loop, the
            reference), "chunk" (chunked form), "compiled" (under torch.compile),
            "triton" (fused kernels, CUDA only), "numba" (CPU inference kernel) or
            "auto" (the fastest available for the input's device, dtype and gradients).
        cuda_graphs: at inference on CUDA through the Triton kernels, replay each input
            shape's forward as a CUDA graph (lam_embed/inference/cuda_graphs.py) instead of
            launching its kernels one by one from Python.
        fuse_layer_code: run the layer code around the delta rule fused where the
            backend has a fused form: on CUDA with "triton" at inference inside the
            Triton kernels (ops/triton/), with "compiled" or with gradients under
            torch.compile; on CPU with "numba" (or "auto") at float32 inference as one
            numba kernel (ops/numba.py). False: eager everywhere (debugging, or where
            neither works).
        packed_inference: at float32 inference on CPU through the numba kernel, run a
            right-padded batch on its valid tokens only (lam_embed/inference/packing.py):
            the padding that sentence-transformers adds to each batch is never computed.
            The outputs on valid tokens equal the padded forward's to float32 rounding;
            padded rows of the last hidden state are zero. False: the padded forward.
        cpu_int8: at float32 inference on CPU through the numba kernel, the layers' matrix
            products (the token mixer's input and output projections, the FFNs) in int8:
            weights quantised per output row once, activations per token at each call
            (lam_embed/inference/int8.py). Faster where int8 products are (x86 CPUs), and no
            longer float32's embeddings: their cosine with them was at least 0.99 on every
            STS-B test sentence with 8-bit weights (CPUs with VNNI), 0.989 with 7-bit ones
            (without; docs/performance.md). Off by default; embeddings, the delta rule
            and the norms stay float32 either way, and so does streaming (a forward that
            carries a state runs the eager layer code).
        gelu_epilogue: at 16-bit inference on CUDA through the Triton layer code, the
            FFN's first product, bias and GELU as one cuBLASLt call with a GELU epilogue
            (the separate GELU kernel took 0.43 ms of a 4.8 ms forward of 32,768 tokens
            on an H200). The epilogue computes the tanh form of GELU, within 4.7e-4 of the
            erf form, below bfloat16's rounding; float32 keeps the erf form.
        graph_streams: inside a CUDA graph, the batch is cut into up to this many parts
            whose layers run on as many CUDA streams, so that one part's kernels fill the
            SMs another leaves idle (values unchanged: each sample's computation is its
            own). Two took a bf16 forward of 64 x 512 tokens on an H200 from 4.30 to
            3.90 ms; three, four and six gained less. 1: one stream.
        graph_streams_min_tokens: batches of fewer tokens (batch x padded length) run
            on one stream, where the parts' extra launches cost more than the overlap
            gains. graph_streams and this are read when a shape's graph is captured.
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
        position_overflow: str = "wrap",
        token_repeat_cap: int | None = None,
        token_weights_min_tokens: int | None = None,
        outlier_pooling_temperature: float | None = None,
        outlier_pooling_min_tokens: int = 512,
        pooling_gate_min_tokens: int | None = None,
        long_input_min_tokens: int | None = None,
        chunk_size: int = 128,
        conv_size: int = 4,
        fast_decay_init: float = 0.3,
        slow_decay_init: float = 0.85,
        state_dropout: float = 0.0,
        rms_norm_eps: float = 1e-6,
        delta_impl: str = "auto",
        cuda_graphs: bool = True,
        fuse_layer_code: bool = True,
        packed_inference: bool = True,
        cpu_int8: bool = False,
        gelu_epilogue: bool = True,
        graph_streams: int = 2,
        graph_streams_min_tokens: int = 16384,
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
        self.position_overflow = position_overflow
        self.token_repeat_cap = token_repeat_cap
        self.token_weights_min_tokens = token_weights_min_tokens
        self.outlier_pooling_temperature = outlier_pooling_temperature
        self.outlier_pooling_min_tokens = outlier_pooling_min_tokens
        self.pooling_gate_min_tokens = pooling_gate_min_tokens
        self.long_input_min_tokens = long_input_min_tokens
        self.chunk_size = chunk_size
        self.conv_size = conv_size
        self.fast_decay_init = fast_decay_init
        self.slow_decay_init = slow_decay_init
        self.state_dropout = state_dropout
        self.rms_norm_eps = rms_norm_eps
        self.delta_impl = delta_impl
        self.cuda_graphs = cuda_graphs
        self.fuse_layer_code = fuse_layer_code
        self.packed_inference = packed_inference
        self.cpu_int8 = cpu_int8
        self.gelu_epilogue = gelu_epilogue
        self.graph_streams = graph_streams
        self.graph_streams_min_tokens = graph_streams_min_tokens
        self.validate_lam()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_lam(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "position_table_size", "type_vocab_size",
            "chunk_size", "conv_size", "graph_streams",
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
        for name in ("cuda_graphs", "fuse_layer_code", "packed_inference", "cpu_int8", "gelu_epilogue"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LAMConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.graph_streams_min_tokens, int) or self.graph_streams_min_tokens < 0:
            raise ValueError(f"LAMConfig.graph_streams_min_tokens must be an integer >= 0, "
                             f"got {self.graph_streams_min_tokens!r}")
        if self.position_overflow not in POSITION_OVERFLOW:
            raise ValueError(f"LAMConfig.position_overflow must be one of {POSITION_OVERFLOW}, "
                             f"got {self.position_overflow!r}")
        cap = self.token_repeat_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"LAMConfig.token_repeat_cap must be None or a positive integer, got {cap!r}")
        least = self.token_weights_min_tokens
        if least is not None and (isinstance(least, bool) or not isinstance(least, int) or least < 0):
            raise ValueError(f"LAMConfig.token_weights_min_tokens must be None or an integer >= 0, got {least!r}")
        temperature = self.outlier_pooling_temperature
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not 0 < temperature < float("inf")):
            raise ValueError(f"LAMConfig.outlier_pooling_temperature must be None or a positive number, "
                             f"got {temperature!r}")
        least = self.outlier_pooling_min_tokens
        if isinstance(least, bool) or not isinstance(least, int) or least < 0:
            raise ValueError(f"LAMConfig.outlier_pooling_min_tokens must be an integer >= 0, got {least!r}")
        for name in ("long_input_min_tokens", "pooling_gate_min_tokens"):
            least = getattr(self, name)
            if least is not None and (isinstance(least, bool) or not isinstance(least, int) or least < 0):
                raise ValueError(f"LAMConfig.{name} must be None or an integer >= 0, got {least!r}")
        if self.delta_impl not in BACKEND_NAMES:
            raise ValueError(f"LAMConfig.delta_impl must be one of {BACKEND_NAMES}, got {self.delta_impl!r}")
