"""The CPU benchmark's ONNX Runtime peers (evaluation/onnx_peers.py): the exported teacher
gives sentence-transformers' embeddings (fp32), and its int8 form stays close to them."""

import numpy as np
import pytest

SENTENCES = [
    "A man is playing a guitar.",
    "short",
    "Two dogs run through a field of tall grass while their owner watches from the porch of an old farmhouse.",
    "The stock market fell sharply on Monday after the central bank raised interest rates again. " * 8,
    "",
]


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    import lam_embed

    return SentenceTransformer(lam_embed.resolve_teacher_path(), device="cpu")


def test_fp32_equals_the_sentence_transformer_in_input_order(minilm_onnx, minilm):
    """Mixed lengths (one truncated at max_seq_length, an empty string), a batch size that
    splits them: the same embeddings, in the input order."""
    from lam_embed.evaluation.onnx_peers import OnnxEncoder

    encoder = OnnxEncoder(minilm_onnx["onnx-fp32"], minilm.tokenizer, minilm.max_seq_length, threads=1)
    want = minilm.encode(SENTENCES, batch_size=2)
    got = encoder.encode(SENTENCES, batch_size=2)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_int8_stays_close(minilm_onnx, minilm):
    from lam_embed.evaluation.onnx_peers import OnnxEncoder

    encoder = OnnxEncoder(minilm_onnx["onnx-int8"], minilm.tokenizer, minilm.max_seq_length, threads=1)
    want = minilm.encode(SENTENCES[:4])
    got = encoder.encode(SENTENCES[:4])
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.9, cosine
    assert np.abs(got - want).max() > 1e-4  # the weights really are quantised
