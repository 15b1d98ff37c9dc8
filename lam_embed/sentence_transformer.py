"""LAM as a sentence-transformers model made only of built-in modules."""

from __future__ import annotations

import os
import tempfile

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .modeling_lam import LAMModel
from .teacher import resolve_teacher_path

try:  # sentence-transformers >= 6.2 moved the modules; 6.0 has only the old path
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.models import Normalize, Pooling, Transformer


def build_sentence_transformer(
    model: LAMModel,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    max_seq_length: int = 512,
    device: str | None = None,
):
    """Wrap a LAMModel as ``SentenceTransformer([Transformer, mean Pooling, Normalize])``.

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
    pooling = Pooling(model.config.hidden_size, pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)
