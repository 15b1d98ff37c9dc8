"""all-MiniLM-L6-v2 in ONNX Runtime, as a CPU user who wants speed runs it: the CPU
benchmark's peers of LAM.

The teacher is exported by ``torch.onnx`` (the dynamo exporter; batch and length dynamic)
with its mean pooling and normalisation inside the graph, so that one session call gives
the sentence embeddings; ONNX Runtime runs it with all its graph optimisations ("fp32").
"int8" is the same graph with the weights of its matrix products dynamically quantised
(``onnxruntime.quantization.quantize_dynamic``, signed int8 weights), the usual recipe for
CPU inference. onnxruntime, onnx and onnxscript are optional dependencies (the "onnx" extra).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PEERS = ("onnx-fp32", "onnx-int8")
FILES = {"onnx-fp32": "minilm-fp32.onnx", "onnx-int8": "minilm-int8.onnx"}


class MeanPooledEncoder(torch.nn.Module):
    """A BERT model, then mean pooling over the valid tokens and L2 normalisation: what
    sentence-transformers' [Transformer, Pooling(mean), Normalize] computes."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1)


def export_minilm(teacher: str | Path, folder: str | Path) -> dict[str, Path]:
    """The fp32 and int8 ONNX files of the teacher at ``teacher`` in ``folder`` (made once,
    reused when present): {"onnx-fp32": path, "onnx-int8": path}."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / file for name, file in FILES.items()}
    if not paths["onnx-fp32"].is_file():
        logger.info("exporting %s to %s", teacher, paths["onnx-fp32"])
        model = MeanPooledEncoder(AutoModel.from_pretrained(str(teacher), attn_implementation="sdpa")).eval()
        example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=model.model.config.max_position_embeddings)
        shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
        # "sentence_embedding": the graph already has a node named "embedding".
        program = torch.onnx.export(model, example, input_names=["input_ids", "attention_mask"],
                                    output_names=["sentence_embedding"], dynamic_shapes=shapes, dynamo=True,
                                    optimize=True, verbose=False)
        program.save(str(paths["onnx-fp32"]))
    if not paths["onnx-int8"].is_file():
        quantize_dynamic(str(paths["onnx-fp32"]), str(paths["onnx-int8"]), weight_type=QuantType.QInt8)
    return paths


class OnnxEncoder:
    """``encode(sentences)`` through an ONNX file of ``export_minilm``, batched as
    ``SentenceTransformer.encode`` batches: sorted by length, padded to the longest of each
    batch, truncated at ``max_seq_length``; embeddings in the input order."""

    def __init__(self, path: str | Path, tokenizer, max_seq_length: int, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer, self.max_seq_length = tokenizer, max_seq_length

    def embed_sequences(self, sequences: list[list[int]], batch_tokens: int) -> np.ndarray:
        """Embeddings of token-id sequences (special tokens included), batched as
        ``longdoc.embed_sequences`` batches them: longest first, at most ``batch_tokens``
        padded tokens a batch."""
        from .longdoc import token_batches

        out = np.empty((len(sequences), self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        for batch in token_batches([len(s) for s in sequences], batch_tokens):
            longest = len(sequences[batch[0]])
            ids = np.zeros((len(batch), longest), dtype=np.int64)
            mask = np.zeros((len(batch), longest), dtype=np.int64)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = sequences[i]
                mask[row, : len(sequences[i])] = 1
            out[batch] = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out

    def encode(self, sentences: list[str], batch_size: int = 64) -> np.ndarray:
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        out = np.empty((len(sentences), self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        for start in range(0, len(sentences), batch_size):
            rows = order[start:start + batch_size]
            features = self.tokenizer([sentences[i] for i in rows], padding=True, truncation=True,
                                      max_length=self.max_seq_length, return_tensors="np")
            out[rows] = self.session.run(None, {"input_ids": features["input_ids"].astype(np.int64),
                                                "attention_mask": features["attention_mask"].astype(np.int64)})[0]
        return out
