"""LAM: a BERT encoder whose self-attention is a dual-state DeltaNet layer (docs/SPEC.md):
embeddings, layers, encoder and model, as transformers' modeling_bert.py; the token mixer
is in layers/dual_state_delta_net.py."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput

from .backends import Backend, carried_backend, load_triton, prepare_triton, select_backend
from .checksums import verify_checksums
from .configuration_lam import LAMConfig
from .inference import input_checks, int8
from .inference.cuda_graphs import ForwardGraphs, layers_on_streams
from .inference.packing import PackedBatch
from .layers.dual_state_delta_net import (
    CausalDepthwiseConv,
    DualStateDeltaNet,
    ResonanceFlux,
)
from .parameter_changes import (
    KeepsDerivedWeights,
    install_change_hooks,
    optimizer_steps,
    parameter_registrations,
)
from .state import LAMState, LayerState

try:  # transformers >= 5: init functions that respect weights already loaded
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    init = nn.init


# LAMConfig.token_weights_min_tokens, outlier_pooling_min_tokens: the token weights and the
# outlier weighting apply in full from this many times that length on, and in part between.
TOKEN_WEIGHTS_RAMP = 4.0


def repeat_cap_weights(occurrences: torch.Tensor, cap: int) -> torch.Tensor:
    """The weight of one occurrence of a token id that occurs ``occurrences`` times:
    min(1, cap / occurrences), so that the id weighs at most ``cap`` occurrences in all."""
    return (cap / occurrences.clamp(min=1)).clamp(max=1.0)


def ramp_share(tokens: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """log(tokens / min_tokens) / log(TOKEN_WEIGHTS_RAMP), clipped to [0, 1]: how much of a
    long-input weighting a sample of ``tokens`` valid tokens gets, so that no one length
    changes a text's embedding by a jump."""
    share = torch.log(tokens.clamp(min=1) / max(min_tokens, 1e-9)) / math.log(TOKEN_WEIGHTS_RAMP)
    return share.clamp(0.0, 1.0)


def outlier_factors(x: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, temperature: float,
                    min_tokens: int) -> torch.Tensor:
    """exp(-temperature * s * cos(row, m)) for each row of ``x`` (B, L, D), m the mean of the
    valid rows under ``weights`` (B, L), s = ramp_share of the sample's length; scaled so
    that each sample's largest valid factor is 1 (the pooling renormalises), 0 on padding
    (LAMConfig.outlier_pooling_temperature)."""
    rows = x.float()
    mean = (weights[..., None] * rows).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-12)
    cosine = nn.functional.cosine_similarity(rows, mean[:, None, :], dim=-1)
    return row_factors(-temperature * cosine, valid, min_tokens)


def row_factors(logits: torch.Tensor, valid: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """exp(s * logits) for each row, s = ramp_share of the sample's length in ``valid`` (B, L),
    scaled so that each sample's largest valid factor is 1 (the pooling renormalises), 0 on
    padding."""
    logits = ramp_share(valid.sum(1, keepdim=True), min_tokens) * logits.float()
    logits = logits.masked_fill(valid == 0, float("-inf"))
    return torch.exp(logits - logits.amax(1, keepdim=True))


def weight_rows_for_pooling(x: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            cap: int | None, vocab_size: int, id_weights: torch.Tensor | None = None,
                            min_tokens: int = 0, outlier_temperature: float | None = None,
                            outlier_min_tokens: int = 0, gate: nn.Module | None = None,
                            gate_min_tokens: int = 0) -> torch.Tensor:
    """``x`` (B, L, D) with each valid row of a sample scaled by its pooling weight times
    valid / summed weights, so that mean pooling of the result is the weighted mean
    (LAMConfig.token_repeat_cap, token_weights_min_tokens, outlier_pooling_temperature,
    pooling_gate_min_tokens). The weight: repeat_cap_weights of its id over the sample's
    valid tokens (1 without a cap); times ``id_weights[id] ** ramp_share(n, min_tokens)``
    for a sample of n valid tokens; times outlier_factors of the rows under the weights so
    far; times row_factors of the logits of ``gate`` (an nn.Linear of a row to one logit).
    Padded rows are left as they are."""
    valid = attention_mask.to(torch.float32)
    ids = input_ids.clamp(0, vocab_size - 1)
    weights = valid
    if cap is not None:
        occurrences = torch.zeros(ids.shape[0], vocab_size, device=ids.device).scatter_add_(1, ids, valid)
        weights = repeat_cap_weights(occurrences.gather(1, ids), cap) * valid
    # A batch padded to at most min_tokens holds no sample they apply to (their share is 0 and
    # their factors exactly 1): skip their work, known from the shape without waiting for a GPU.
    padded_length = x.shape[1]
    if id_weights is not None and padded_length > min_tokens:
        weights = weights * id_weights.float()[ids] ** ramp_share(valid.sum(1, keepdim=True), min_tokens)
    if outlier_temperature is not None and padded_length > outlier_min_tokens:
        weights = weights * outlier_factors(x, weights, valid, outlier_temperature, outlier_min_tokens)
    if gate is not None and padded_length > gate_min_tokens:
        # In float32 whatever the model's dtype, as the other factors.
        logits = nn.functional.linear(x.float(), gate.weight.float(), gate.bias.float()).squeeze(-1)
        weights = weights * row_factors(logits, valid, gate_min_tokens)
    weights = weights * (valid.sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1e-12))
    weights = torch.where(valid > 0, weights, torch.ones_like(weights))
    return x * weights[..., None].to(x.dtype)


class LAMEmbeddings(nn.Module):
    """BERT embeddings: word + absolute position + token type, then LayerNorm.

    Inputs longer than the position table run at every length up to the memory limit:
    position p past the table reads row p mod position_table_size ("wrap") or its last
    row ("clamp"), as ``config.position_overflow`` says; the token mixer is recurrent,
    so order is still seen.
    """

    def __init__(self, config: LAMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.position_table_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config  # shared with the model: position_overflow is read at each call

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                position_offset: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``position_offset`` (B,): the position of each sample's first token (a continuation);
        ``positions``: each token's position, of ids of any shape (a packed batch's rows)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            if position_offset is not None:
                positions = position_offset[:, None] + positions
        table = self.position_embeddings.num_embeddings
        positions = positions % table if self.config.position_overflow == "wrap" else positions.clamp(max=table - 1)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))

    def fused(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """forward at inference on CUDA as one Triton kernel (ops/triton/layer.py), with ids
        and types clamped to their tables."""
        return load_triton().layer.embedding_layer_norm(
            input_ids, token_type_ids, self.word_embeddings.weight, self.position_embeddings.weight,
            self.token_type_embeddings.weight, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
            wrap_positions=self.config.position_overflow == "wrap")


class LAMLayer(KeepsDerivedWeights):
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
        self.exact_gelu = config.hidden_act == "gelu"  # erf's, not a tanh approximation
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def residual_norm(self, norm: nn.LayerNorm, x: torch.Tensor, y: torch.Tensor, backend: Backend) -> torch.Tensor:
        """norm(x + dropout(y)); at inference on CUDA one Triton kernel (ops/triton/layer.py)."""
        if not self.training and backend.layer_code == "triton":
            return load_triton().layer.residual_layer_norm(x, y, norm.weight, norm.bias, norm.eps)
        return norm(x + self.dropout(y))

    def feed_forward(self, h: torch.Tensor, backend: Backend) -> torch.Tensor:
        """ffn_out(GELU(ffn_in(h))); see LAMConfig.gelu_epilogue for the 16-bit CUDA inference path
        and LAMConfig.cpu_int8 for int8 products on CPU."""
        if backend.int8_products:
            sources = (self.attention_norm.weight, self.attention_norm.bias, self.ffn_in.weight, self.ffn_in.bias,
                       self.ffn_out.weight, self.ffn_out.bias)
            inner, outer = self.kept("int8", sources,
                                     lambda: int8.pack_feed_forward(self.attention_norm, self.ffn_in, self.ffn_out))
            return int8.int8_feed_forward(h, inner, outer, self.activation, exact_gelu=self.exact_gelu)
        if (self.delta_net.config.gelu_epilogue and h.dtype in (torch.bfloat16, torch.float16) and self.gelu_activation
                and not self.training and backend.layer_code == "triton"):
            inner = torch._addmm_activation(self.ffn_in.bias, h.flatten(0, -2), self.ffn_in.weight.t(), use_gelu=True)
            return self.ffn_out(inner.unflatten(0, h.shape[:-1]))
        return self.ffn_out(self.activation(self.ffn_in(h)))

    def mix(self, x: torch.Tensor, mask: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        """The attention block: token mixing, residual, LayerNorm (the backend selected for x if not given)."""
        backend = backend or self.delta_net.select_backend(x)
        return self.residual_norm(self.attention_norm, x, self.delta_net(x, mask, backend), backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, backend: Backend, state: LayerState | None = None,
                state_after_chunks: torch.Tensor | None = None):
        """With ``state`` or ``state_after_chunks``: from and to a carried state (see
        DualStateDeltaNet.forward), returning (output, LayerState)."""
        if state is None and state_after_chunks is None:
            h = self.mix(x, mask, backend)
            return self.residual_norm(self.ffn_norm, h, self.feed_forward(h, backend), backend)
        mixed, new_state = self.delta_net(x, mask, backend, state=state, state_after_chunks=state_after_chunks)
        h = self.residual_norm(self.attention_norm, x, mixed, backend)
        return self.residual_norm(self.ffn_norm, h, self.feed_forward(h, backend), backend), new_state


@dataclass
class LAMModelOutput(BaseModelOutput):
    """BaseModelOutput and, from a forward with ``use_cache`` or ``past_state``, the carried ``state``."""

    state: LAMState | None = None


# What a saved folder carries so that transformers' ``trust_remote_code=True`` loading finds
# LAM in the installed lam_embed package without ``import lam_embed``: an auto_map in its
# config.json and two files that import the classes (transformers names the package to
# install when they cannot).
AUTO_MAP = {"AutoConfig": "configuration_lam.LAMConfig", "AutoModel": "modeling_lam.LAMModel"}
REMOTE_CODE_FILES = {"configuration_lam.py": "from lam_embed.configuration_lam import LAMConfig",
                     "modeling_lam.py": "from lam_embed.modeling_lam import LAMModel"}
REMOTE_CODE_TEMPLATE = '''"""LAM is defined in the lam_embed package (pip install lam_embed). This file lets
transformers load this folder with trust_remote_code=True without `import lam_embed`."""

{line}  # noqa: F401
'''


class LAMPreTrainedModel(PreTrainedModel):
    config_class = LAMConfig
    config: LAMConfig
    base_model_prefix = "lam"
    supports_gradient_checkpointing = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers' ``save_pretrained``, plus the auto_map and the two files that let
        ``trust_remote_code=True`` load the folder where lam_embed is installed but not imported."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        for name, line in REMOTE_CODE_FILES.items():
            with open(os.path.join(str(save_directory), name), "w", encoding="utf-8") as f:
                f.write(REMOTE_CODE_TEMPLATE.format(line=line))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers' ``from_pretrained``, but a checkpoint that lacks tensors or
        holds tensors of other shapes is an error, never a silently re-initialised model,
        and so are weights whose sha256 differs from the folder's ``lam_checksums.json``."""
        want_info = kwargs.pop("output_loading_info", False)
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        checksums = os.path.join(str(where), "lam_checksums.json") if where is not None else None
        if checksums is not None and os.path.isfile(checksums):
            with open(checksums, encoding="utf-8") as f:
                verify_checksums(str(where), json.load(f))
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {
            "missing": sorted(info.get("missing_keys") or []),
            "of another shape": sorted(str(m) for m in info.get("mismatched_keys") or []),
            "unexpected": sorted(info.get("unexpected_keys") or []),
        }
        problems = {k: v for k, v in problems.items() if v}
        if problems:
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
        if module is getattr(self, "pooling_gate", None):
            # Zero logits: a gate added to a trained model leaves its embeddings as they were.
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class LAMModel(LAMPreTrainedModel):
    """The LAM encoder. ``forward`` returns ``last_hidden_state`` (B, L, hidden_size)."""

    def __init__(self, config: LAMConfig):
        super().__init__(config)
        self.embeddings = LAMEmbeddings(config)
        self.layers = nn.ModuleList(LAMLayer(config) for _ in range(config.num_hidden_layers))
        if config.long_input_min_tokens is not None:
            # The layers that read samples of more than long_input_min_tokens valid tokens.
            self.long_input_layers = nn.ModuleList(LAMLayer(config) for _ in range(config.num_hidden_layers))
        if config.pooling_gate_min_tokens is not None:
            # One logit a last hidden row: how much more (or less) the row weighs in the
            # pooling of a long input (LAMConfig.pooling_gate_min_tokens).
            self.pooling_gate = nn.Linear(config.hidden_size, 1)
        if config.token_weights_min_tokens is not None:
            # One pooling weight per token id (LAMConfig.token_weights_min_tokens), saved with the weights.
            self.register_buffer("token_weights", torch.ones(config.vocab_size))
        self.post_init()
        prepare_triton(config)

    def with_long_input_layers(self, min_tokens: int, long_input_layers: dict | None = None) -> "LAMModel":
        """A new LAMModel with this one's weights that reads inputs of more than ``min_tokens``
        valid tokens with a second set of layers (LAMConfig.long_input_min_tokens): the state
        dict ``long_input_layers`` of a ModuleList like ``self.layers`` (another run's layers),
        by default a copy of this model's layers."""
        if self.config.long_input_min_tokens is not None:
            raise ValueError("the model has long-input layers already")
        return self._extended({"long_input_min_tokens": min_tokens}, {
            f"long_input_layers.{k}": v for k, v in (long_input_layers or self.layers.state_dict()).items()})

    def with_pooling_gate(self, min_tokens: int) -> "LAMModel":
        """A new LAMModel with this one's weights and a pooling gate for inputs of more than
        ``min_tokens`` valid tokens (LAMConfig.pooling_gate_min_tokens), at zero: it gives this
        model's embeddings until it is trained."""
        if self.config.pooling_gate_min_tokens is not None:
            raise ValueError("the model has a pooling gate already")
        return self._extended({"pooling_gate_min_tokens": min_tokens}, {})

    def _extended(self, config_changes: dict, tensors: dict) -> "LAMModel":
        """A new LAMModel of this config with ``config_changes``, holding this model's weights,
        then ``tensors``; what neither gives keeps its initial value."""
        config = self.config.to_dict()
        config.pop("model_type", None)
        model = LAMModel(LAMConfig(**{**config, **config_changes}))
        model.load_state_dict({**model.state_dict(), **self.state_dict(), **tensors})
        weight = self.embeddings.word_embeddings.weight
        return model.to(device=weight.device, dtype=weight.dtype).train(self.training)

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _carried_forward(self, input_ids, attention_mask, token_type_ids, past_state, return_dict,
                         state_after_tokens=None):
        """forward from and to a carried state: eager layer code around the delta rule of
        ``carried_backend``, replayed from a CUDA graph where the fused forward would be. A
        model with long-input layers carries states through them: a carried state belongs to
        a document longer than any one piece (lam_embed/streaming.py reads documents of at
        most long_input_min_tokens tokens in one plain forward)."""
        B, C = input_ids.shape[0], self.config.chunk_size
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if past_state is not None:
            past_state.check(self.config, B, input_ids.device)
        pending = input_checks.check_input_values(self.config, input_ids, attention_mask, token_type_ids)
        mask = attention_mask.bool()
        valid = mask.sum(1)
        if state_after_tokens is not None:
            state_after_tokens = torch.as_tensor(state_after_tokens, device=input_ids.device)
            if state_after_tokens.shape != (B,) or bool(((state_after_tokens < 0) | (state_after_tokens > valid)).any()):
                raise ValueError(f"state_after_tokens must hold one count per sample in 0..its valid tokens "
                                 f"({valid.tolist()}), got {state_after_tokens.tolist()}")
            valid = state_after_tokens
        complete = valid // C  # chunks whose end the returned state has read
        offset = past_state.offset if past_state is not None else input_ids.new_zeros(B)
        wants_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        backend = carried_backend(self.config, input_ids.device, wants_grad)
        layer_states = past_state.layers if past_state is not None else [None] * len(self.layers)
        graphed = None
        if backend.delta_impl == "triton" and self._graphs_allowed(input_ids):
            # A piece of a stream is launch-bound (about a hundred small kernels a layer):
            # replaying them from a graph is what makes an append cheap.
            install_change_hooks()
            if past_state is None:
                layer_states = [layer.delta_net.zero_state(B, input_ids.device, self.dtype)
                                for layer in self._carried_layer_set()]
            extras = [offset, complete] + [t for state in layer_states for t in (state.fast, state.slow, state.conv_tail)]
            graphed = self._carried_graphs(self, functools.partial(self._carried_graph_forward, backend=backend),
                                           input_ids, attention_mask, token_type_ids,
                                           changes=(optimizer_steps(), parameter_registrations(),
                                                    self.config.position_overflow),
                                           chunk_size=C, tensors_read=self._graph_tensors_read, extras=extras)
        if graphed is not None:
            x, *flat = graphed
            states = [LayerState(*(t.clone() for t in flat[i:i + 3])) for i in range(0, len(flat), 3)]
        else:
            x, states = self._carried_layers(input_ids, mask, token_type_ids, offset, complete, layer_states, backend,
                                             clamp=pending is not None)
        state = LAMState(states, offset + complete * C)
        output = (x, state) if return_dict is False else LAMModelOutput(last_hidden_state=x, state=state)
        if pending is not None:
            input_checks.check_values(self.config, *pending)
        return output

    def _carried_layers(self, input_ids, mask, token_type_ids, offset, complete, layer_states, backend,
                        clamp: bool = False):
        """Embeddings and layers from the carried ``layer_states`` (None: none): the last
        hidden state and each layer's state after ``complete`` chunks. ``clamp``: as in _encode."""
        if clamp:
            input_ids = input_ids.clamp(0, self.config.vocab_size - 1)
            token_type_ids = token_type_ids.clamp(0, self.config.type_vocab_size - 1)
        x = self.embeddings(input_ids, token_type_ids, position_offset=offset)
        states = []
        for layer, state in zip(self._carried_layer_set(), layer_states):
            x, layer_state = layer(x, mask, backend, state=state, state_after_chunks=complete)
            states.append(layer_state)
        return x, states

    def _carried_graph_forward(self, input_ids, attention_mask, token_type_ids, offset, complete, *flat,
                               backend: Backend):
        """What a CUDA graph of a carried forward captures: the last hidden state, then each
        layer's fast, slow and conv_tail after ``complete`` chunks."""
        layer_states = [LayerState(*flat[i:i + 3]) for i in range(0, len(flat), 3)]
        x, states = self._carried_layers(input_ids, attention_mask.bool(), token_type_ids, offset, complete,
                                         layer_states, backend, clamp=True)
        return x, *(t for state in states for t in (state.fast, state.slow, state.conv_tail))

    def select_backend(self, input_ids: torch.Tensor) -> Backend:
        """The backend of a forward of ``input_ids`` (lam_embed/backends.py), for every layer."""
        wants_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return select_backend(self.config, input_ids.device, self.embeddings.word_embeddings.weight.dtype,
                              wants_grad, self.training)

    def _encode(self, input_ids, token_type_ids, mask, backend: Backend, hidden_states: list | None = None,
                clamp: bool = False, parts: int = 1, long_inputs: bool = False) -> torch.Tensor:
        """Embeddings and layers: the last hidden state. The layer inputs and the output
        are appended to ``hidden_states`` when it is given. ``parts`` > 1: the layers run
        on that many CUDA streams (layers_on_streams; no hidden states). ``clamp``: the
        ids' values are checked only once the forward pass is queued (on CUDA, see
        inference/input_checks.py), so ids outside the tables must not reach the embedding
        lookup, where an out-of-range read would end the CUDA context instead of raising.
        ``long_inputs``: through ``long_input_layers`` (LAMConfig.long_input_min_tokens)."""
        layers = self.long_input_layers if long_inputs else self.layers
        if not self.training and backend.layer_code == "triton":
            x = self.embeddings.fused(input_ids, token_type_ids)  # clamps as it reads
        else:
            if clamp:
                input_ids = input_ids.clamp(0, self.config.vocab_size - 1)
                token_type_ids = token_type_ids.clamp(0, self.config.type_vocab_size - 1)
            packed = None
            if backend.layer_code == "numba" and self.config.packed_inference and hidden_states is None:
                packed = PackedBatch.from_mask(mask)
            if packed is not None:
                # The valid tokens only, one sample after another (inference/packing.py).
                x = self.embeddings(packed.pack(input_ids), packed.pack(token_type_ids), positions=packed.positions)
                for layer in layers:
                    x = layer(x, packed, backend)
                return packed.unpack(x)
            x = self.embeddings(input_ids, token_type_ids)
        if parts > 1:
            return layers_on_streams(layers, x, mask, parts, backend)
        for layer in layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, mask, backend)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def _graph_forward(self, input_ids, attention_mask, token_type_ids, backend: Backend, long_inputs: bool = False):
        """What a CUDA graph captures: the last hidden state and the value summary of the inputs."""
        summary = input_checks.value_summary(input_ids, attention_mask, token_type_ids)
        config = self.config
        parts = min(config.graph_streams, input_ids.shape[0]) if input_ids.numel() >= config.graph_streams_min_tokens else 1
        return self._encode(input_ids, token_type_ids, attention_mask.bool(), backend, clamp=True, parts=parts,
                            long_inputs=long_inputs), summary

    def _graph_tensors_read(self) -> list[torch.Tensor]:
        """What a captured graph reads besides its buffers: the parameters' storage (as
        aliases, which keep it even when a parameter's ``.data`` is replaced) and the
        weights each layer stacked from them (DualStateDeltaNet.stacked_weights)."""
        stacked = [t for layer in self._all_layers() for t in layer.delta_net.kept_stacked_weights()]
        return [p.detach() for p in self.parameters()] + stacked

    def uses_cuda_graphs(self, input_ids: torch.Tensor, backend: Backend | None = None) -> bool:
        """Whether a forward of ``input_ids`` replays CUDA graphs (inference/cuda_graphs.py):
        with ``config.cuda_graphs``, at inference on CUDA through the Triton layer code, not
        inside another capture."""
        return self._graphs_allowed(input_ids) and (backend or self.select_backend(input_ids)).layer_code == "triton"

    def _graphs_allowed(self, input_ids: torch.Tensor) -> bool:
        """Whether this forward may replay graphs at all, whatever its backend."""
        return bool(self.config.cuda_graphs and input_ids.is_cuda and input_ids.numel() > 0 and not self.training
                    and not torch.is_grad_enabled() and not torch.cuda.is_current_stream_capturing())

    def _all_layers(self) -> list[LAMLayer]:
        return [*self.layers, *getattr(self, "long_input_layers", ())]

    def _carried_layer_set(self) -> nn.ModuleList:
        """The layers a carried forward runs: the long-input layers where the model has them."""
        return self.long_input_layers if self.config.long_input_min_tokens is not None else self.layers

    # The CUDA graphs of the forward, of the forward through long_input_layers (a shape may
    # be seen with both) and, apart, of carried forwards (a stream's pieces).
    _GRAPH_CACHES = ("_cuda_graphs", "_long_input_cuda_graphs", "_carried_cuda_graphs")

    def _graph_cache(self, name: str) -> ForwardGraphs:
        graphs = self.__dict__.get(name)
        if graphs is None:
            graphs = self.__dict__[name] = ForwardGraphs()
        return graphs

    @property
    def _graphs(self) -> ForwardGraphs:
        return self._graph_cache("_cuda_graphs")

    @property
    def _carried_graphs(self) -> ForwardGraphs:
        return self._graph_cache("_carried_cuda_graphs")

    def _apply(self, fn, *args, **kwargs):
        for name in self._GRAPH_CACHES:  # .to(), .half(), ...: the graphs read the old tensors
            self.__dict__.pop(name, None)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode:  # training moves the weights: the graphs' memory is better freed now
            for name in self._GRAPH_CACHES:
                self.__dict__.pop(name, None)
        return super().train(mode)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_state: LAMState | None = None,
        use_cache: bool | None = None,
        state_after_tokens: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        """As BERT's forward. ``past_state`` (lam_embed/state.py): the input continues the
        documents whose chunks that state ended; ``use_cache``: also return, as ``state``,
        the state after the complete chunks of each sample (its tokens past them are to be
        given again with the next piece); ``state_after_tokens`` (B,): the state after the
        complete chunks of each sample's first that many tokens instead (the rest, say a
        closing [SEP], is read for the output only). These run the eager layer code, on CUDA
        replayed from CUDA graphs."""
        input_checks.check_shapes(input_ids, attention_mask, token_type_ids)
        if self.config.token_weights_min_tokens is not None and getattr(self, "token_weights", None) is None:
            raise ValueError("config.token_weights_min_tokens is set but the model has no token_weights: "
                             "set both with lam_embed.token_weights.set_token_weights")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if past_state is not None or use_cache or state_after_tokens is not None:
            return self._carried_forward(input_ids, attention_mask, token_type_ids, past_state, return_dict,
                                         state_after_tokens)
        if self.config.long_input_min_tokens is None:
            x, hidden_states, pending = self._last_hidden_state(input_ids, attention_mask, token_type_ids,
                                                                output_hidden_states)
            pendings = [pending]
        else:
            x, hidden_states, pendings = self._routed_last_hidden_state(input_ids, attention_mask, token_type_ids,
                                                                        output_hidden_states)
        x = self.weight_rows_for_pooling(x, input_ids, attention_mask)
        # The output is built before the check waits for the GPU (on CUDA the forward pass is
        # still running), and returned only after it: bad input gives the error, never a result.
        if return_dict is False:
            output = (x,) if hidden_states is None else (x, tuple(hidden_states))
        else:
            output = BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if hidden_states else None)
        for pending in pendings:
            if pending is not None:
                input_checks.check_values(self.config, *pending)
        return output

    def weight_rows_for_pooling(self, x: torch.Tensor, input_ids: torch.Tensor,
                                attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden rows ``x`` scaled so that mean pooling gives the weighted mean the
        config asks for (weight_rows_for_pooling); ``x`` itself when it asks for none."""
        config = self.config
        id_weights = self.token_weights if config.token_weights_min_tokens is not None else None
        gate = self.pooling_gate if config.pooling_gate_min_tokens is not None else None
        if config.token_repeat_cap is None and id_weights is None and not config.outlier_pooling_temperature \
                and gate is None:
            return x
        return weight_rows_for_pooling(x, input_ids, attention_mask, config.token_repeat_cap, config.vocab_size,
                                       id_weights, config.token_weights_min_tokens or 0,
                                       config.outlier_pooling_temperature, config.outlier_pooling_min_tokens,
                                       gate, config.pooling_gate_min_tokens or 0)

    def _last_hidden_state(self, input_ids, attention_mask, token_type_ids, output_hidden_states,
                           long_inputs: bool = False):
        """The last hidden state through one set of layers (``long_input_layers`` with
        ``long_inputs``), the hidden states when asked for, and the pending value check."""
        backend = self.select_backend(input_ids)
        graphed = None
        if not output_hidden_states and self.uses_cuda_graphs(input_ids, backend):
            install_change_hooks()
            graphs = self._graph_cache("_long_input_cuda_graphs" if long_inputs else "_cuda_graphs")
            # token_type_ids may stay None here: the graph's buffer of them is then zero.
            graphed = graphs(self, functools.partial(self._graph_forward, backend=backend, long_inputs=long_inputs),
                             input_ids, attention_mask, token_type_ids,
                             changes=(optimizer_steps(), parameter_registrations(), self.config.position_overflow),
                             chunk_size=self.config.chunk_size, tensors_read=self._graph_tensors_read)
        hidden_states = None
        if graphed is not None:
            x, stats = graphed
            pending = input_checks.summary_to_host(stats)
        else:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            pending = input_checks.check_input_values(self.config, input_ids, attention_mask, token_type_ids)
            if output_hidden_states:
                hidden_states = []
            x = self._encode(input_ids, token_type_ids, attention_mask.bool(), backend, hidden_states,
                             clamp=pending is not None, long_inputs=long_inputs)
        return x, hidden_states, pending

    def _routed_last_hidden_state(self, input_ids, attention_mask, token_type_ids, output_hidden_states):
        """_last_hidden_state with the samples of more than config.long_input_min_tokens valid
        tokens through long_input_layers and the others through layers. A batch of both kinds
        runs each set on its own samples (each sample's computation is its own) and puts the
        rows back in order; returns the pending value checks of each part."""
        limit = self.config.long_input_min_tokens
        is_long = attention_mask.sum(1) > limit
        # A batch padded to at most the limit holds no long sample: no host sync to find out.
        n_long = int(is_long.sum()) if attention_mask.shape[1] > limit else 0
        if n_long in (0, input_ids.shape[0]):
            x, hidden_states, pending = self._last_hidden_state(input_ids, attention_mask, token_type_ids,
                                                                output_hidden_states, long_inputs=n_long > 0)
            return x, hidden_states, [pending]
        parts = []
        for long_inputs, rows in ((False, (~is_long).nonzero().squeeze(1)), (True, is_long.nonzero().squeeze(1))):
            types = None if token_type_ids is None else token_type_ids[rows]
            parts.append((rows, self._last_hidden_state(input_ids[rows], attention_mask[rows], types,
                                                        output_hidden_states, long_inputs=long_inputs)))

        def merged(pick) -> torch.Tensor:
            first = pick(parts[0][1])
            out = first.new_empty((input_ids.shape[0], *first.shape[1:]))
            for rows, part in parts:
                out[rows] = pick(part)
            return out

        x = merged(lambda part: part[0])
        hidden_states = None
        if output_hidden_states:
            hidden_states = [merged(lambda part, i=i: part[1][i]) for i in range(len(parts[0][1][1]))]
        return x, hidden_states, [part[2] for _, part in parts]
