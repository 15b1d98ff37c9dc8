"""The released model's CPU embeddings of a few fixed inputs: written once by running this
file, read by tests/test_reference_embeddings.py, so that a change of structure that must
not change behaviour is checked against what the model computed before it.

    python tests/reference_embeddings.py   # rewrites tests/data/reference-embeddings-cpu.npz
"""

from pathlib import Path

import numpy as np

from lam_embed.release import RELEASED as RELEASE  # noqa: E402
REFERENCE = Path(__file__).resolve().parent / "data" / "reference-embeddings-cpu.npz"

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
    "",
]
# About 3,000 tokens: 24 chunks of 128, with a partial last chunk.
LONG_TEXT = " ".join(
    f"Paragraph {i}: the river bank was steep, the water ran fast, and the ferry crossed it {i % 7} times a day."
    for i in range(125)
)


def reference_inputs() -> list[str]:
    return [*SENTENCES, LONG_TEXT]


IMPLEMENTATIONS = ("auto", "chunk")  # on CPU: the numba kernel, and the eager PyTorch code


def released_model(delta_impl: str = "auto"):
    """The released LAM as a sentence-transformers model on the CPU, truncating at 4,096 tokens."""
    import lam_embed
    from lam_embed.release import load_release

    model = load_release(RELEASE)
    model.config.delta_impl = delta_impl
    return lam_embed.build_sentence_transformer(model, max_seq_length=4096, device="cpu")


def embed(model) -> np.ndarray:
    """Embeddings of reference_inputs(), one at a time (no padding enters the figures)."""
    return np.stack([model.encode([text], convert_to_numpy=True)[0] for text in reference_inputs()])


if __name__ == "__main__":
    models = {impl: released_model(impl) for impl in IMPLEMENTATIONS}
    tokens = len(models["auto"].tokenizer(LONG_TEXT)["input_ids"])
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez(REFERENCE, **{impl: embed(model) for impl, model in models.items()})
    print(f"wrote {REFERENCE} ({len(reference_inputs())} inputs, the long one {tokens} tokens)")
