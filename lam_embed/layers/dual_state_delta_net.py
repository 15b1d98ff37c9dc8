"""The token mixer of a LAM layer: the dual-state DeltaNet (docs/SPEC.md section 2), its
resonance flux and causal convolutions. How it runs (eager, torch.compile, Triton or numba
kernels) is the backend that lam_embed/backends.py selects."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import Backend, carried_backend, load_numba, load_triton, select_backend
from ..configuration_lam import LAMConfig
from ..inference import int8
from ..inference.packing import PackedBatch
from ..ops import dual_state_delta_rule
from ..ops.common import (
    PROJECTION_SCALARS,
    PROJECTION_VECTORS,
    PSI_MAX,
    PSI_MIN,
    projection_columns,
)
from ..parameter_changes import KeepsDerivedWeights
from ..state import LayerState


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
        """The tensors from which the fused kernels (ops/triton/) compute this forward,
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


class DualStateDeltaNet(KeepsDerivedWeights):
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
        """Weight and bias of all input projections stacked in one matrix, in the column
        order of ``ops.common.projection_columns``: one matrix product then computes them
        all. Built at each call (a copy of 2.4 MB at D = 384), so the parameters stay those
        of the separate modules. Zero rows pad it to a multiple of 64 outputs: BLAS is much
        slower on 4D + 5H = 1596 columns than on 1600."""
        modules = {
            "q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "output_gate": self.g_proj,
            "beta": self.beta_proj, "decay_fast": self.fast_decay_proj, "decay_slow": self.slow_decay_proj,
            "gate_fast": self.fast_gate_proj, "gate_slow": self.slow_gate_proj,
        }
        stacked = [modules[name] for name in (*PROJECTION_VECTORS, *PROJECTION_SCALARS)]
        rows = sum(m.out_features for m in stacked)
        pad = -rows % 64
        template = self.fast_decay_proj.bias
        weight = torch.cat([*(m.weight for m in stacked), template.new_zeros(pad, stacked[0].in_features)])
        bias = torch.cat([m.bias if m.bias is not None else template.new_zeros(m.out_features) for m in stacked]
                         + [template.new_zeros(pad)])
        return weight, bias

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_projection() and the q, k, v convolution weights stacked (3D, 1, K).

        Without gradients they are kept between calls: on CUDA building them is a handful
        of small kernels and several hundred microseconds of host work a layer (the host
        floor of a forward went from 3.4 to 8.2 ms without the copy), on CPU a 2.4 MB copy
        a layer (3 to 12% of an encode of short sentences on 2 cores). They are rebuilt when
        a parameter moves or changes in place (its version counter), after any torch
        optimizer step (fused optimizers change parameters without moving the counter)
        and on .to() or when training starts; only a write through ``param.data``, or in place to a
        parameter made under ``torch.inference_mode`` (it has no version counter), goes
        unseen."""
        convs = (self.q_conv.weight, self.k_conv.weight, self.v_conv.weight)
        if torch.is_grad_enabled():
            return (*self.input_projection(), torch.cat(convs))
        return self.kept("stacked", self._projection_sources(),
                         lambda: (*self.input_projection(), torch.cat(convs)))

    def _projection_sources(self) -> tuple[torch.Tensor, ...]:
        return (
            self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.g_proj.weight, self.beta_proj.weight,
            self.fast_decay_proj.weight, self.fast_decay_proj.bias, self.slow_decay_proj.weight,
            self.slow_decay_proj.bias, self.fast_gate_proj.weight, self.slow_gate_proj.weight,
            self.q_conv.weight, self.k_conv.weight, self.v_conv.weight,
        )

    def kept_stacked_weights(self) -> tuple:
        """The weights stacked_weights keeps between calls (none before the first call
        without gradients, or after a change that drops them)."""
        return self.kept_value("stacked") or ()

    def int8_weights(self) -> tuple:
        """The stacked input projection and the output projection packed for int8 products
        (LAMConfig.cpu_int8, inference/int8.py), kept as stacked_weights is. The output
        projection's input is the per-head RMSNorm times a gate below 1: its channels' sizes
        follow the norm's weight."""
        return self.kept("int8", (*self._projection_sources(), self.o_proj.weight, self.norm_weight),
                         lambda: (int8.pack_linear(*self.stacked_weights()[:2]), int8.pack_linear(
                             self.o_proj.weight, input_scale=self.norm_weight.detach().abs().repeat(self.num_heads))))

    def _wants_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def select_backend(self, x: torch.Tensor) -> Backend:
        """The backend for a call on x outside a model forward (which selects it for all layers)."""
        return select_backend(self.config, x.device, x.dtype, self._wants_grad(x), self.training)

    def zero_state(self, batch_size: int, device, dtype: torch.dtype) -> LayerState:
        """The state before any token: zero memories and convolution tail (``dtype``: the activations')."""
        d, K = self.head_dim, self.config.conv_size
        memory = torch.zeros(batch_size, self.num_heads, d, d, dtype=torch.float32, device=device)
        tail = torch.zeros(batch_size, K - 1, 3 * self.num_heads * d, dtype=dtype, device=device)
        return LayerState(memory, memory.clone(), tail)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, backend: Backend | None = None,
                state: LayerState | None = None, state_after_chunks: torch.Tensor | None = None):
        """x: (B, L, D); mask: (B, L) bool, True on valid tokens; or, with the numba layer
        code, x the (N, D) rows of a packed batch and mask its PackedBatch
        (inference/packing.py); ``backend``: as LAMModel selects it for the whole forward
        (else selected here for x).

        ``state``: the carried state (lam_embed/state.py) this input continues, and
        ``state_after_chunks`` (B,): also return the state after that many chunks of each
        sample, as (output, LayerState); both run the eager layer code around the delta rule
        (a backend with fused layer code is replaced by ``carried_backend``)."""
        config, H = self.config, self.num_heads
        weight, bias, conv_weight = self.stacked_weights()
        carried = state is not None or state_after_chunks is not None
        if carried and (backend is None or backend.layer_code != "eager"):
            backend = carried_backend(config, x.device, self._wants_grad(x))
        backend = backend or self.select_backend(x)
        # On a GPU the code around the op is many small elementwise kernels. At inference
        # the delta-rule kernels read the input projection and apply the convolution and
        # activations themselves, and write the normed, gated output; with gradients the
        # code around the op runs under torch.compile.
        if backend.layer_code == "triton":
            # The kernels read rows of padding as zeros: no need to zero them first.
            projected = F.linear(x, weight, bias)
            return load_triton().layer.delta_net_from_projection(
                projected, mask, conv_weight, self.flux, self.norm_weight, self.o_proj.weight, self.eps, H,
                config.chunk_size)
        packed = mask if isinstance(mask, PackedBatch) else None
        if backend.layer_code == "numba":
            project = output_projection = None
            if backend.int8_products:
                projection, output_projection = self.int8_weights()
                project = functools.partial(int8.int8_linear, packed=projection)
            if packed is None:
                features = delta_net_features(x, mask, weight, bias, conv_weight, H, project=project)
                o = load_numba().delta_rule_layer(*features, mask, self.flux, self.norm_weight, self.eps,
                                                  config.chunk_size)
            else:
                features = delta_net_features(x, None, weight, bias, conv_weight, H, packed_positions=packed.positions,
                                              project=project)
                o = load_numba().delta_rule_layer(*features, None, self.flux, self.norm_weight, self.eps,
                                                  config.chunk_size, segments=(packed.starts, packed.lengths))
            if output_projection is not None:
                return int8.int8_linear(o, output_projection)
            return F.linear(o, self.o_proj.weight)
        if packed is not None:
            raise ValueError(f"a packed batch runs through the numba layer code only, not {backend.layer_code!r}")
        compiled = backend.layer_code == "compiled"
        features, output = _compiled_layer_functions() if compiled else (delta_net_features, delta_net_output)
        carry = {}
        if carried:
            B = x.shape[0]
            if state is None:
                state = self.zero_state(B, x.device, x.dtype)
            if state_after_chunks is None:  # no chunk to read past: the state stays as given
                state_after_chunks = torch.zeros(B, dtype=torch.long, device=x.device)
            (q, k, v, output_gate, *scalars), qkv_in = features(x, mask, weight, bias, conv_weight, H,
                                                                 conv_tail=state.conv_tail)
            carry = {"initial_state": (state.fast, state.slow), "state_after_chunks": state_after_chunks}
        else:
            q, k, v, output_gate, *scalars = features(x, mask, weight, bias, conv_weight, H)
        q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow = (t.transpose(1, 2) for t in (q, k, v, *scalars))
        o = dual_state_delta_rule(
            q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask, self.flux,
            chunk_size=config.chunk_size, state_dropout=config.state_dropout, training=self.training,
            impl=backend.delta_impl, qk_l2norm=True, **carry,
        )  # (B, H, L, d) float32
        if not carried:
            return output(o.transpose(1, 2), output_gate, self.norm_weight, self.o_proj.weight, self.eps)
        o, (fast, slow) = o
        out = output(o.transpose(1, 2), output_gate, self.norm_weight, self.o_proj.weight, self.eps)
        # The K - 1 projection rows before each sample's boundary; qkv_in starts with the old tail.
        rows = (state_after_chunks * config.chunk_size)[:, None] + torch.arange(config.conv_size - 1, device=x.device)
        tail = qkv_in.gather(1, rows[..., None].expand(-1, -1, qkv_in.shape[-1]))
        return out, LayerState(fast, slow, tail)


def delta_net_features(x, mask, weight, bias, conv_weight, num_heads: int, conv_tail=None, packed_positions=None,
                       project=None):
    """The inputs of the delta rule from the layer input x (B, L, D): q, k, v =
    SiLU(conv(x W)) per head, (B, L, H, d) (the delta rule normalises q and k:
    qk_l2norm); the output gate sigmoid(x W_g), (B, L, D); the sigmoids of beta, the two
    decays and the two state gates, (B, L, H) each.

    ``weight``, ``bias``: DualStateDeltaNet.input_projection(); ``conv_weight``: the
    q, k, v convolutions stacked (3D, 1, K). ``conv_tail`` (B, K - 1, 3D): the projection
    rows before x that the convolution reads (a carried state); the result then ends with
    those rows and x's, (B, K - 1 + L, 3D), for the next state.

    A packed batch (inference/packing.py; CPU inference with numba): x is its valid rows
    (N, D), ``mask`` None and ``packed_positions`` (N,) each row's position in its sample;
    the results have N rows. ``project``: computes ``F.linear(x, weight, bias)`` another
    way (int8 products: inference/int8.py).
    """
    D, H = x.shape[-1], num_heads
    columns = projection_columns(D, H)
    # Padding is zeroed before the projections (q, k, v have no bias), so it is zero
    # in the convolution and never reaches a valid token. Beta, decays and gates of
    # padded positions are never read (the delta rule masks them).
    x = x if mask is None else x * mask[..., None].to(x.dtype)
    projected = F.linear(x, weight, bias) if project is None else project(x)
    qkv_in = projected[..., columns["q"].start : columns["v"].stop]
    if conv_tail is not None:
        qkv_in = torch.cat([conv_tail.to(qkv_in.dtype), qkv_in], 1)
    if packed_positions is not None:
        # q, k, v are the first columns (projection_columns): the kernel reads them in place.
        qkv = load_numba().packed_causal_conv(projected, conv_weight, packed_positions)
    else:
        qkv = causal_depthwise_conv(qkv_in, conv_weight)
    if conv_tail is not None:
        qkv = qkv[:, conv_tail.shape[1]:]
    # q, k and v each in a buffer of its own, all three with the same (B, L, H, d)
    # strides: the fused kernel reads them as they are (it takes one set of strides),
    # and the (B, L, 3D) buffers are freed before the delta rule runs.
    q, k, v = (F.silu(qkv[..., i * D : (i + 1) * D]).unflatten(-1, (H, -1)) for i in range(3))
    # The output gate and the five scalars are adjacent columns: one sigmoid for all.
    gates = torch.sigmoid(projected[..., columns["output_gate"].start : columns[PROJECTION_SCALARS[-1]].stop])
    scalars = gates[..., D:].unflatten(-1, (len(PROJECTION_SCALARS), H)).unbind(-2)
    features = (q, k, v, gates[..., :D], *scalars)
    return features if conv_tail is None else (features, qkv_in)


def delta_net_output(o, output_gate, norm_weight, o_weight, eps: float):
    """The layer output from the delta rule's o (B, L, H, d): per-head RMSNorm, times the
    output gate (B, L, D) from delta_net_features, then the output projection."""
    o = F.rms_norm(o, o.shape[-1:], norm_weight.float(), eps)
    return F.linear(o.flatten(2).to(output_gate.dtype) * output_gate, o_weight)


@functools.cache
def _compiled_layer_functions():
    # dynamic=True: one graph for every batch size and length (and every layer: the
    # weights are arguments, not module attributes).
    return torch.compile(delta_net_features, dynamic=True), torch.compile(delta_net_output, dynamic=True)
