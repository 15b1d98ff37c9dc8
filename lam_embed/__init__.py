"""LAM: a sentence encoder with linear-time dual-state DeltaNet layers.

Importing this package registers the ``lam`` architecture with transformers'
Auto classes, so ``SentenceTransformer(folder)`` loads a saved LAM model;
``lam_embed.load()`` gives the released model.
"""

from transformers import AutoConfig, AutoModel

from .configuration_lam import LAMConfig
from .inference.pipeline import encode_texts
from .modeling_lam import LAMModel
from .release import load, model_path
from .sentence_transformer import build_sentence_transformer
from .streaming import DocumentState, encode_document, encode_documents, start_document
from .teacher import DEFAULT_TEACHER, from_teacher, resolve_teacher_path

AutoConfig.register(LAMConfig.model_type, LAMConfig, exist_ok=True)
AutoModel.register(LAMConfig, LAMModel, exist_ok=True)

__all__ = [
    "DEFAULT_TEACHER",
    "DocumentState",
    "LAMConfig",
    "LAMModel",
    "build_sentence_transformer",
    "encode_document",
    "encode_documents",
    "encode_texts",
    "from_teacher",
    "load",
    "model_path",
    "resolve_teacher_path",
    "start_document",
]
