"""LAM as a sentence-transformers model made only of built-in modules."""

from __future__ import annotations

import os
import tempfile

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .model_card import attach_model_card
from .modeling_lam import LAMModel
from .teacher import resolve_teacher_path

try:  # sentence-transformers >= 6.2 moved the modules; 6.0 has only the old path
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.models import Normalize, Pooling, Transformer


# The sentence-transformers pooling modes a LAM model may use (all built in, so a saved
# folder loads without trust_remote_code).
POOLING_MODES = ("mean", "max", "cls", "lasttoken")

# Name parts of the token mixer's parameters: LAM's DeltaNet, and in the BERT model LAM
# replaces, its self-attention and that attention's output projection.
TOKEN_MIXER_NAMES = (".delta_net.", ".attention.self.", ".attention.output.dense.")
# For error messages: 'delta_net', 'attention.self', 'attention.output.dense'.
TOKEN_MIXER_NAMES_TEXT = ", ".join(repr(n.strip(".")) for n in TOKEN_MIXER_NAMES)


def is_token_mixer_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` (as named_parameters() gives it) belongs to a token mixer."""
    return any(part in f".{name}" for part in TOKEN_MIXER_NAMES)


def replace_transformer_model(st, model) -> None:
    """Put ``model`` in place of the transformers model of ``st``'s first module
    (sentence-transformers 6.3 made ``auto_model`` a read-only view of ``model``)."""
    module = st[0]
    if isinstance(getattr(type(module), "auto_model", None), property):
        module.model = model
    else:
        module.auto_model = model
    if module.auto_model is not model:
        raise RuntimeError(f"could not replace the model of {type(module).__name__}")


def _check_pooling(mode: str) -> None:
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}; got {mode!r}")


def set_pooling(st, mode: str) -> None:
    """Replace the Pooling module of the SentenceTransformer ``st`` by one of ``mode``."""
    _check_pooling(mode)
    for index, module in enumerate(st):
        if isinstance(module, Pooling):
            # get_embedding_dimension from sentence-transformers 6.3 on; the old name before
            dimension = getattr(module, "get_embedding_dimension", None) or module.get_sentence_embedding_dimension
            st[index] = Pooling(dimension(), pooling_mode=mode).to(st.device)
            return
    raise ValueError("the model has no Pooling module to replace")


def module_pooling_mode(pooling) -> str:
    """The mode of a Pooling module."""
    mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers >= 6.3
    return mode if isinstance(mode, str) else pooling.get_pooling_mode_str()


def pooling_mode(st) -> str | None:
    """The mode of ``st``'s Pooling module (None without one)."""
    return next((module_pooling_mode(m) for m in st if isinstance(m, Pooling)), None)


def build_sentence_transformer(
    model: LAMModel,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    max_seq_length: int = 512,
    device: str | None = None,
    pooling: str = "mean",
    manifest: dict | None = None,
):
    """Wrap a LAMModel as ``SentenceTransformer([Transformer, Pooling, Normalize])``, the
    pooling of mode ``pooling`` (one of POOLING_MODES). With ``manifest`` (a release's:
    figures, commands) ``st.save()`` writes LAM's model card from it; without, the model is
    not one LAM has trained or measured, and sentence-transformers' card describes it.

    ``tokenizer`` is a tokenizer or a folder/hub name to load one from; ``None``
    takes the default teacher's. LAM has no hard length limit (positions past the
    table reuse it: LAMConfig.position_overflow), so ``max_seq_length`` only sets where inputs are truncated.
    After ``st.save(folder)``, ``import lam_embed; SentenceTransformer(folder)`` loads it.
    """
    from sentence_transformers import SentenceTransformer

    if not isinstance(model, LAMModel):
        raise TypeError(f"model must be a LAMModel, got {type(model).__name__}")
    if max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    _check_pooling(pooling)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(resolve_teacher_path(tokenizer))
    tokenizer.padding_side = "right"  # LAM reads tokens in order; see inference/input_checks.py
    # sentence-transformers caps max_seq_length at the tokenizer's limit when loading;
    # LAM's only limit is the one chosen here.
    tokenizer.model_max_length = max_seq_length
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        transformer = Transformer(folder, max_seq_length=max_seq_length)
    pooling_module = Pooling(model.config.hidden_size, pooling_mode=pooling)
    st = SentenceTransformer(modules=[transformer, pooling_module, Normalize()], device=device)
    if manifest is not None:
        attach_model_card(st, manifest)
    return st
