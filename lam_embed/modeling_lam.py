"""LAM: a BERT encoder whose self-attention is a dual-state DeltaNet layer (docs/SPEC.md)."""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput

from .configuration_lam import LAMConfig
from .cuda_graphs import ForwardGraphs, version_sum
from .ops import dual_state_delta_rule, resolve_impl
from .ops.common import PSI_MAX, PSI_MIN

logger = logging.getLogger(__name__)

try:  # transformers >= 5: init functions that respect weights already loaded
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    init = nn.init


# Counts of the events that a parameter's version counter does not show, for the weights
# each layer keeps stacked (DualStateDeltaNet.stacked_weights) and for the CUDA graphs
# (cuda_graphs.py): optimizer steps (fused optimizers update parameters in place without
# moving their counters) and parameters registered anywhere (a graph reads parameters
# where they were when it was captured, and replacing one by another moves no counter).
# The torch hooks that count them are installed on the first forward that keeps weights
# or replays a graph, not on import.
_optimizer_steps = 0
_parameter_registrations = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _count_parameter_registration(module, name, param) -> None:
    global _parameter_registrations
    _parameter_registrations += 1


@functools.cache
def _install_change_hooks() -> None:
    """Start counting optimizer steps and parameter registrations (once per process).
    Before this, nothing is kept that the counts would have to invalidate."""
    register_optimizer_step_post_hook(_count_optimizer_step)
    torch.nn.modules.module.register_module_parameter_registration_hook(_count_parameter_registration)


def fused_layer_code(x: torch.Tensor, net: DualStateDeltaNet, param: torch.Tensor) -> str | None:
    """How the layer code around the delta rule of ``net`` runs for the input x: "triton"
    (CUDA, delta_impl "triton", no gradient wanted for x or ``param``), "compiled" (CUDA
    with delta_impl "compiled", or "triton" with gradients), "numba" (CPU, delta_impl
    "auto", float32, no gradient wanted, numba installed) or None
    (eager: elsewhere, with delta_impl "chunk" or "naive", or with config.fuse_layer_code off)."""
    if not net.config.fuse_layer_code:
        return None
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or param.requires_grad)
    if not x.is_cuda:
        if (x.device.type == "cpu" and net.config.delta_impl == "auto" and x.dtype == torch.float32
                and not wants_grad and not torch.is_autocast_enabled("cpu") and _layer_numba() is not None):
            return "numba"
        return None
    impl = resolve_impl(net.config.delta_impl, x.device)
    if impl not in ("triton", "compiled"):
        return None
    head_dim = net.head_dim
    if (impl == "compiled" or wants_grad
            or net.training and net.config.state_dropout > 0  # the fused path has no state dropout
            or _layer_triton() is None
            or head_dim < 16 or head_dim & (head_dim - 1)):  # the kernels' tiles: a power of two >= 16
        return "compiled"
    return "triton"


class ResonanceFlux(nn.Module):
    """Coupling strength psi of a chunk, from its mean key, mean written value and a
    bilinear key-value score; all means over the chunk's valid tokens."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.bilinear = nn.Parameter(torch.empty(num_heads, head_dim, head_dim))
        self.temperature = nn.Parameter(torch.empty(num_heads))
        self.hidden = nn.Linear(2 * head_dim + 1, head_dim // 2)
        self.out = nn.Linear(head_dim // 2, 1)

    def forward(self, K: torch.Tensor, U: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """K, U: (B, H, N, C, d) float32; valid: (B, N, C) bool. Returns psi (B, H, N)."""
        w = valid[:, None].to(K.dtype)  # (B, 1, N, C)
        count = w.sum(-1).clamp(min=1)
        U = U * w[..., None]
        mean_k = (K * w[..., None]).sum(-2) / count[..., None]
        mean_u = U.sum(-2) / count[..., None]
        # sum_t k_t^T W u_t over valid tokens = <W, K^T diag(w) U>: one batched product of
        # d x d results, much cheaper than the token-wise bilinear form as an einsum.
        score = (K.transpose(-1, -2) @ U * self.bilinear.float()[:, None]).sum((-2, -1))
        score = score / count / self.temperature.float()[:, None]
        features = torch.cat([mean_k, mean_u, score[..., None]], -1)
        hidden = F.silu(F.linear(features, self.hidden.weight.float(), self.hidden.bias.float()))
        psi = torch.sigmoid(F.linear(hidden, self.out.weight.float(), self.out.bias.float()))[..., 0]
        return psi.clamp(PSI_MIN, PSI_MAX)

    def kernel_parameters(self) -> list[torch.Tensor] | None:
        """The tensors from which the fused kernels (ops/triton.py) compute this forward,
        in their order; None for a subclass with a forward of its own, which they do not
        compute."""
        if type(self).forward is not ResonanceFlux.forward:
            return None
        return [self.bilinear, self.temperature, self.hidden.weight, self.hidden.bias, self.out.weight, self.out.bias]


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of x (B, L, C) with weight (C, 1, K):
    y_t = sum_j weight[:, 0, j] * x_{t - K + 1 + j}, zero before the first position.

    Written as K shifted multiply-adds in the (B, L, C) layout: on CPU this is several
    times faster than nn.Conv1d, which needs (B, C, L) copies on the way in and out.
    """
    K, L = weight.shape[-1], x.shape[1]
    # (K, C), contiguous: a strided row of taps would make every product below slow.
    taps = weight[:, 0].t().contiguous()  # tap K - 1 is the current token
    if torch.compiler.is_compiling():
        # Without in-place updates of slices, which torch.compile turns into copies and
        # several slow kernels: as one expression, the sum becomes one fused kernel.
        return sum(F.pad(x[:, : L - shift], (0, 0, shift, 0)) * taps[K - 1 - shift] for shift in range(min(K, L)))
    y = x * taps[K - 1]
    for shift in range(1, min(K, L)):
        y[:, shift:].addcmul_(x[:, :-shift], taps[K - 1 - shift])
    return y


class CausalDepthwiseConv(nn.Conv1d):
    """Depthwise convolution over positions that sees the current and earlier tokens only."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, D)
        return causal_depthwise_conv(x, self.weight)


class DualStateDeltaNet(nn.Module):
    """The token mixer of a LAM layer (docs/SPEC.md section 2)."""

    def __init__(self, config: LAMConfig):
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        # The config object is shared with the model, so a change of config.delta_impl
        # or config.chunk_size after construction takes effect here. What the weights'
        # shapes fix is kept as attributes: a read of a transformers config attribute costs
        # microseconds, a visible share of a short input's forward on a GPU.
        self.config = config
        self.num_heads, self.head_dim, self.eps = H, config.head_dim, config.rms_norm_eps
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.g_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.q_conv, self.k_conv, self.v_conv = (CausalDepthwiseConv(D, config.conv_size) for _ in range(3))
        self.beta_proj = nn.Linear(D, H, bias=False)
        self.fast_decay_proj = nn.Linear(D, H)
        self.slow_decay_proj = nn.Linear(D, H)
        self.fast_gate_proj = nn.Linear(D, H, bias=False)
        self.slow_gate_proj = nn.Linear(D, H, bias=False)
        self.flux = ResonanceFlux(H, config.head_dim)
        self.norm_weight = nn.Parameter(torch.ones(config.head_dim))

    def input_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of all input projections stacked in one matrix, in the order
        q, k, v, output gate, beta, fast decay, slow decay, fast gate, slow gate: one
        matrix product then computes them all. Built at each call (a copy of 2.4 MB at
        D = 384), so the parameters stay those of the separate modules. Zero rows pad it
        to a multiple of 64 outputs: BLAS is much slower on 4D + 5H = 1596 columns than on 1600."""
        weights = [
            self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.g_proj.weight, self.beta_proj.weight,
            self.fast_decay_proj.weight, self.slow_decay_proj.weight,
            self.fast_gate_proj.weight, self.slow_gate_proj.weight,
        ]
        rows = sum(w.shape[0] for w in weights)
        pad = -rows % 64
        weight = torch.cat([*weights, weights[0].new_zeros(pad, weights[0].shape[1])])
        H = self.beta_proj.out_features
        zeros = self.fast_decay_proj.bias.new_zeros
        bias = torch.cat([
            zeros(4 * self.q_proj.out_features + H), self.fast_decay_proj.bias, self.slow_decay_proj.bias,
            zeros(2 * H + pad),
        ])
        return weight, bias

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_projection() and the q, k, v convolution weights stacked (3D, 1, K).

        Without gradients they are kept between calls: on CUDA building them is a handful
        of small kernels and several hundred microseconds of host work a layer (the host
        floor of a forward went from 3.4 to 8.2 ms without the copy), on CPU a 2.4 MB copy
        a layer (3 to 12% of an encode of short sentences on 2 cores). They are rebuilt when
        a parameter moves or changes in place (its version counter), after any torch
        optimizer step (fused optimizers change parameters without moving the counter)
        and on .to() or train(); only a write through ``param.data``, or in place to a
        parameter made under ``torch.inference_mode`` (it has no version counter), goes
        unseen."""
        convs = (self.q_conv.weight, self.k_conv.weight, self.v_conv.weight)
        if torch.is_grad_enabled():
            return (*self.input_projection(), torch.cat(convs))
        _install_change_hooks()
        sources = (
            self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.g_proj.weight, self.beta_proj.weight,
            self.fast_decay_proj.weight, self.fast_decay_proj.bias, self.slow_decay_proj.weight,
            self.slow_decay_proj.bias, self.fast_gate_proj.weight, self.slow_gate_proj.weight, *convs,
        )
        key = (_optimizer_steps, version_sum(sources), *((p.data_ptr(), p.dtype) for p in sources))
        cached = self.__dict__.get("_stacked")
        if cached is None or cached[0] != key:
            cached = self._stacked = (key, (*self.input_projection(), torch.cat(convs)))
        return cached[1]

    def kept_stacked_weights(self) -> tuple:
        """The weights stacked_weights keeps between calls (none before the first call
        without gradients, or after a change that drops them)."""
        cached = self.__dict__.get("_stacked")
        return cached[1] if cached is not None else ()

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_stacked", None)  # .to(), .half(), ...: never keep copies of the old tensors
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self.__dict__.pop("_stacked", None)
        return super().train(mode)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); mask: (B, L) bool, True on valid tokens."""
        config, H = self.config, self.num_heads
        weight, bias, conv_weight = self.stacked_weights()
        # On a GPU the code around the op is many small elementwise kernels. At inference
        # the delta-rule kernels read the input projection and apply the convolution and
        # activations themselves, and one Triton kernel (layer_triton.py) does the output
        # side; with gradients the code around the op runs under torch.compile.
        mode = fused_layer_code(x, self, self.q_proj.weight)
        if mode == "triton":
            layer_triton = _layer_triton()
            # The kernels read rows of padding as zeros: no need to zero them first.
            projected = F.linear(x, weight, bias)
            return layer_triton.delta_net_from_projection(
                projected, mask, conv_weight, self.flux, self.norm_weight, self.o_proj.weight, self.eps, H,
                config.chunk_size)
        if mode == "numba":
            features = delta_net_features(x, mask, weight, bias, conv_weight, H)
            o = _layer_numba().delta_rule_layer(
                *features, mask, self.flux, self.norm_weight, self.eps, config.chunk_size)
            return F.linear(o, self.o_proj.weight)
        features, output = _compiled_layer_functions() if mode == "compiled" else (delta_net_features, delta_net_output)
        q, k, v, output_gate, *scalars = features(x, mask, weight, bias, conv_weight, H)
        q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow = (t.transpose(1, 2) for t in (q, k, v, *scalars))
        o = dual_state_delta_rule(
            q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask, self.flux,
            chunk_size=config.chunk_size, state_dropout=config.state_dropout, training=self.training,
            impl=config.delta_impl, qk_l2norm=True,
        )  # (B, H, L, d) float32
        return output(o.transpose(1, 2), output_gate, self.norm_weight, self.o_proj.weight, self.eps)


def delta_net_features(x, mask, weight, bias, conv_weight, num_heads: int):
    """The inputs of the delta rule from the layer input x (B, L, D): q, k, v =
    SiLU(conv(x W)) per head, (B, L, H, d) (the delta rule normalises q and k:
    qk_l2norm); the output gate sigmoid(x W_g), (B, L, D); the sigmoids of beta, the two
    decays and the two state gates, (B, L, H) each.

    ``weight``, ``bias``: DualStateDeltaNet.input_projection(); ``conv_weight``: the
    q, k, v convolutions stacked (3D, 1, K).
    """
    D, H = x.shape[-1], num_heads
    # Padding is zeroed before the projections (q, k, v have no bias), so it is zero
    # in the convolution and never reaches a valid token. Beta, decays and gates of
    # padded positions are never read (the delta rule masks them).
    projected = F.linear(x * mask[..., None].to(x.dtype), weight, bias)
    qkv = causal_depthwise_conv(projected[..., : 3 * D], conv_weight)
    # q, k and v each in a buffer of its own, all three with the same (B, L, H, d)
    # strides: the fused kernel reads them as they are (it takes one set of strides),
    # and the (B, L, 3D) buffers are freed before the delta rule runs.
    q, k, v = (F.silu(qkv[..., i * D : (i + 1) * D]).unflatten(-1, (H, -1)) for i in range(3))
    gates = torch.sigmoid(projected[..., 3 * D : 4 * D + 5 * H])
    scalars = gates[..., D:].unflatten(-1, (5, H)).unbind(2)
    return (q, k, v, gates[..., :D], *scalars)


def delta_net_output(o, output_gate, norm_weight, o_weight, eps: float):
    """The layer output from the delta rule's o (B, L, H, d): per-head RMSNorm, times the
    output gate (B, L, D) from delta_net_features, then the output projection."""
    o = F.rms_norm(o, o.shape[-1:], norm_weight.float(), eps)
    return F.linear(o.flatten(2).to(output_gate.dtype) * output_gate, o_weight)


@functools.cache
def _layer_triton():
    """The module layer_triton, or None where triton does not import."""
    try:
        from . import layer_triton
    except ImportError:
        return None
    return layer_triton


@functools.cache
def _layer_numba():
    """The module layer_numba, or None where numba does not import or cannot compile
    (the eager code then runs: slower on CPU, same results)."""
    try:
        from . import layer_numba
    except ImportError:
        return None
    except Exception as err:  # e.g. numba finds no writable folder for its cache
        logger.warning("the CPU kernel of lam_embed/layer_numba.py is unavailable (%s: %s); using the eager code",
                       type(err).__name__, err)
        return None
    return layer_numba


@functools.cache
def _compiled_layer_functions():
    # dynamic=True: one graph for every batch size and length (and every layer: the
    # weights are arguments, not module attributes).
    return torch.compile(delta_net_features, dynamic=True), torch.compile(delta_net_output, dynamic=True)


_side_stream_lists: dict = {}


def _side_streams(device: torch.device, count: int) -> list:
    """``count`` side streams of _layers_on_streams on this device, made once."""
    streams = _side_stream_lists.setdefault(device, [])
    while len(streams) < count:
        streams.append(torch.cuda.Stream(device))
    return streams[:count]


class LAMEmbeddings(nn.Module):
    """BERT embeddings: word + absolute position + token type, then LayerNorm.

    Inputs longer than the position table reuse it cyclically (position p reads
    row p mod position_table_size): the token mixer is recurrent, so order is
    still seen, and every length up to the memory limit runs.
    """

    def __init__(self, config: LAMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.position_table_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) % self.position_embeddings.num_embeddings
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))

    def fused(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """forward at inference on CUDA as one Triton kernel (layer_triton.py), with ids and
        types clamped to their tables."""
        return _layer_triton().embedding_layer_norm(
            input_ids, token_type_ids, self.word_embeddings.weight, self.position_embeddings.weight,
            self.token_type_embeddings.weight, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)


class LAMLayer(nn.Module):
    """Post-LayerNorm encoder layer, as BERT's, with the DeltaNet as token mixer."""

    def __init__(self, config: LAMConfig):
        super().__init__()
        self.delta_net = DualStateDeltaNet(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = ACT2FN[config.hidden_act]
        self.gelu_activation = config.hidden_act in ("gelu", "gelu_new", "gelu_pytorch_tanh")
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def residual_norm(self, norm: nn.LayerNorm, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """norm(x + dropout(y)); at inference on CUDA one Triton kernel (layer_triton.py)."""
        if not self.training and fused_layer_code(x, self.delta_net, norm.weight) == "triton":
            return _layer_triton().residual_layer_norm(x, y, norm.weight, norm.bias, norm.eps)
        return norm(x + self.dropout(y))

    def mix(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention block: token mixing, residual, LayerNorm."""
        return self.residual_norm(self.attention_norm, x, self.delta_net(x, mask))

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """ffn_out(GELU(ffn_in(h))); see LAMConfig.gelu_epilogue for the 16-bit CUDA inference path."""
        if (self.delta_net.config.gelu_epilogue and h.dtype in (torch.bfloat16, torch.float16) and self.gelu_activation
                and not self.training and fused_layer_code(h, self.delta_net, self.ffn_in.weight) == "triton"):
            inner = torch._addmm_activation(self.ffn_in.bias, h.flatten(0, -2), self.ffn_in.weight.t(), use_gelu=True)
            return self.ffn_out(inner.unflatten(0, h.shape[:-1]))
        return self.ffn_out(self.activation(self.ffn_in(h)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.mix(x, mask)
        return self.residual_norm(self.ffn_norm, h, self.feed_forward(h))


class LAMPreTrainedModel(PreTrainedModel):
    config_class = LAMConfig
    config: LAMConfig
    base_model_prefix = "lam"
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' ``from_pretrained``, but a checkpoint that lacks tensors or
        holds tensors of other shapes is an error, never a silently re-initialised model."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {
            "missing": sorted(info.get("missing_keys") or []),
            "of another shape": sorted(str(m) for m in info.get("mismatched_keys") or []),
            "unexpected": sorted(info.get("unexpected_keys") or []),
        }
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            detail = "; ".join(f"{len(v)} {k} (e.g. {', '.join(v[:3])})" for k, v in problems.items())
            raise ValueError(f"the LAM checkpoint at {where} does not match the model: {detail}")
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, CausalDepthwiseConv):
            # Start as the identity (only the current token's tap is 1): the teacher's
            # q/k/v projections then mean what they meant in the teacher.
            weight = torch.zeros_like(module.weight)
            weight[..., -1] = 1.0
            init.copy_(module.weight, weight)
        elif isinstance(module, ResonanceFlux):
            init.normal_(module.bilinear, std=config.initializer_range)
            init.constant_(module.temperature, math.sqrt(config.head_dim))
        elif isinstance(module, DualStateDeltaNet):
            init.constant_(module.fast_decay_proj.bias, math.log(config.fast_decay_init / (1 - config.fast_decay_init)))
            init.constant_(module.slow_decay_proj.bias, math.log(config.slow_decay_init / (1 - config.slow_decay_init)))
            init.ones_(module.norm_weight)


class LAMModel(LAMPreTrainedModel):
    """The LAM encoder. ``forward`` returns ``last_hidden_state`` (B, L, hidden_size)."""

    def __init__(self, config: LAMConfig):
        super().__init__(config)
        self.embeddings = LAMEmbeddings(config)
        self.layers = nn.ModuleList(LAMLayer(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _encode(self, input_ids, token_type_ids, mask, hidden_states: list | None = None,
                clamp: bool = False, parts: int = 1) -> torch.Tensor:
        """Embeddings and layers: the last hidden state. The layer inputs and the output
        are appended to ``hidden_states`` when it is given. ``parts`` > 1: the layers run
        on that many CUDA streams (_layers_on_streams; no hidden states). ``clamp``: the
        ids' values are checked only once the forward pass is queued (on CUDA, see
        check_input_values), so ids outside the tables must not reach the embedding
        lookup, where an out-of-range read would end the CUDA context instead of raising."""
        if (not self.training and self.layers
                and fused_layer_code(input_ids, self.layers[0].delta_net, self.embeddings.word_embeddings.weight) == "triton"):
            x = self.embeddings.fused(input_ids, token_type_ids)  # clamps as it reads
        else:
            if clamp:
                input_ids = input_ids.clamp(0, self.config.vocab_size - 1)
                token_type_ids = token_type_ids.clamp(0, self.config.type_vocab_size - 1)
            x = self.embeddings(input_ids, token_type_ids)
        if parts > 1:
            return self._layers_on_streams(x, mask, parts)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, mask)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def _layers_on_streams(self, x: torch.Tensor, mask: torch.Tensor, parts: int) -> torch.Tensor:
        """The layers for ``parts`` parts of the batch, each on its own CUDA stream (see
        LAMConfig.graph_streams). Each layer is queued for every part before the next layer, so
        that the parts keep pace when run eagerly."""
        main = torch.cuda.current_stream(x.device)
        streams = [main] + _side_streams(x.device, parts - 1)
        for stream in streams[1:]:
            stream.wait_stream(main)  # the embeddings are written on main
        xs, masks = list(x.tensor_split(parts)), mask.tensor_split(parts)
        for layer in self.layers:
            for i, stream in enumerate(streams):
                with torch.cuda.stream(stream):
                    xs[i] = layer(xs[i], masks[i])
        for stream, part in zip(streams[1:], xs[1:]):
            main.wait_stream(stream)
            # Allocated on a side stream and read on main: the allocator must not hand
            # this memory to the side stream again before main is done with it.
            part.record_stream(main)
        return torch.cat(xs)

    def _graph_forward(self, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """What a CUDA graph captures: the last hidden state and the value summary of the inputs."""
        summary = self.value_summary(input_ids, attention_mask, token_type_ids)
        config = self.config
        parts = min(config.graph_streams, input_ids.shape[0]) if input_ids.numel() >= config.graph_streams_min_tokens else 1
        return self._encode(input_ids, token_type_ids, attention_mask.bool(), clamp=True, parts=parts), summary

    def _graph_tensors_read(self) -> list[torch.Tensor]:
        """What a captured graph reads besides its buffers: the parameters' storage (as
        aliases, which keep it even when a parameter's ``.data`` is replaced) and the
        weights each layer stacked from them (DualStateDeltaNet.stacked_weights)."""
        stacked = [t for layer in self.layers for t in layer.delta_net.kept_stacked_weights()]
        return [p.detach() for p in self.parameters()] + stacked

    def uses_cuda_graphs(self, input_ids: torch.Tensor) -> bool:
        """Whether a forward of ``input_ids`` replays CUDA graphs (lam_embed/cuda_graphs.py):
        with ``config.cuda_graphs``, at inference on CUDA through the Triton layer code, not
        inside another capture."""
        net = self.layers[0].delta_net
        return (self.config.cuda_graphs and input_ids.is_cuda and input_ids.numel() > 0 and not self.training
                and not torch.is_grad_enabled() and fused_layer_code(input_ids, net, net.q_proj.weight) == "triton"
                and not torch.cuda.is_current_stream_capturing())

    @property
    def _graphs(self) -> ForwardGraphs:
        graphs = self.__dict__.get("_cuda_graphs")
        if graphs is None:
            graphs = self.__dict__["_cuda_graphs"] = ForwardGraphs()
        return graphs

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_cuda_graphs", None)  # .to(), .half(), ...: the graphs read the old tensors
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode:  # training moves the weights: the graphs' memory is better freed now
            self.__dict__.pop("_cuda_graphs", None)
        return super().train(mode)

    def check_shapes(self, input_ids, attention_mask, token_type_ids) -> None:
        """Raise ValueError naming the argument whose shape or dtype does not fit the model."""
        if input_ids is None:
            raise ValueError("LAMModel needs input_ids")
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got {tuple(input_ids.shape)} {input_ids.dtype}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")

    @staticmethod
    def value_summary(input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """What check_values reads, as one tensor: the smallest and largest id, mask value
        and token type, and whether any mask is left-padded."""
        # aminmax: one reduction for both ends (a summary is part of every forward on CUDA).
        return torch.stack([
            *torch.aminmax(input_ids.long()), *torch.aminmax(attention_mask.long()),
            (attention_mask[:, 1:] > attention_mask[:, :-1]).any().long(), *torch.aminmax(token_type_ids.long()),
        ])

    def check_input_values(self, input_ids, attention_mask, token_type_ids) -> tuple | None:
        """Raise ValueError naming the argument whose values do not fit the model.

        The values are checked here on CPU; on a GPU a read of them would stall the
        forward pass until the GPU caught up, so their summary is returned instead (see
        summary_to_host) for ``check_values`` once the forward pass is queued."""
        if not input_ids.numel():
            return None
        stats = self.value_summary(input_ids, attention_mask, token_type_ids)
        if not stats.is_cuda:
            self.check_values(stats)
            return None
        return self.summary_to_host(stats)

    @staticmethod
    def summary_to_host(stats: torch.Tensor) -> tuple:
        """The summary copied to the host without waiting, and the event that marks the copy done."""
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def check_values(self, stats: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        """The checks of check_input_values, from its summary of the values."""
        if done is not None:
            done.synchronize()  # the copy was queued before the forward pass: long done
        low, high, mask_low, mask_high, left_padded, type_low, type_high = stats.tolist()
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids holds id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
        if mask_low < 0 or mask_high > 1:
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if left_padded:
            raise ValueError(
                "attention_mask must be right-padded (ones, then zeros): LAM reads tokens in order, "
                "so left padding would shift every chunk; set tokenizer.padding_side = 'right'"
            )
        if type_low < 0 or type_high >= self.config.type_vocab_size:
            raise ValueError(f"token_type_ids must lie in [0, {self.config.type_vocab_size})")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        self.check_shapes(input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        graphed = None
        if not output_hidden_states and self.uses_cuda_graphs(input_ids):
            _install_change_hooks()
            # token_type_ids may stay None here: the graph's buffer of them is then zero.
            graphed = self._graphs(self, self._graph_forward, input_ids, attention_mask, token_type_ids,
                                   changes=(_optimizer_steps, _parameter_registrations),
                                   chunk_size=self.config.chunk_size, tensors_read=self._graph_tensors_read)
        hidden_states = None
        if graphed is not None:
            x, stats = graphed
            pending = self.summary_to_host(stats)
        else:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            pending = self.check_input_values(input_ids, attention_mask, token_type_ids)
            if output_hidden_states:
                hidden_states = []
            x = self._encode(input_ids, token_type_ids, attention_mask.bool(), hidden_states, clamp=pending is not None)
        # The output is built before the check waits for the GPU (on CUDA the forward pass is
        # still running), and returned only after it: bad input gives the error, never a result.
        if return_dict is False:
            output = (x,) if hidden_states is None else (x, tuple(hidden_states))
        else:
            output = BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if hidden_states else None)
        if pending is not None:
            self.check_values(*pending)
        return output
