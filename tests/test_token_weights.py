"""Corpus token weights in the pooling of long inputs (LAMConfig.token_weights_min_tokens,
lam_embed/token_weights.py): against a computation written out token by token, short inputs
unchanged, save and load, the command line, and the errors."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import one_pass_embedding, unweighted_rows

from lam_embed.token_weights import corpus_token_counts, main, remove_token_weights, set_token_weights, sif_weights

WORDS = "the a river house blue seven quiet old road bird sang ran below over hill lamp".split()


@pytest.fixture
def st(capped_st):
    return capped_st


def reference_mean(hidden, ids, cap, id_weights, min_tokens):
    """The weighted mean of ``hidden`` rows, weight by weight: the repeat cap's, times the
    id's weight raised to the ramp's share for this many tokens."""
    occurrences = Counter(ids)
    share = min(1.0, max(0.0, math.log(len(ids) / min_tokens) / math.log(4.0)))
    total, weight_sum = 0.0, 0.0
    for row, token in zip(hidden, ids):
        weight = min(1.0, cap / occurrences[token]) * float(id_weights[token]) ** share
        total = total + weight * row.double()
        weight_sum += weight
    return total / weight_sum


def test_weighted_pooling_matches_the_written_out_mean(st):
    lam = st[0].auto_model
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (150, 40, 20, 5)]
    features = st.tokenize(texts)
    id_weights = torch.rand(lam.config.vocab_size, generator=torch.Generator().manual_seed(1)) + 0.05
    plain = unweighted_rows(lam, features)  # weighted below by hand
    with torch.no_grad():
        set_token_weights(lam, id_weights, min_tokens=24)
        try:
            weighted = lam(**features).last_hidden_state
            pooled = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=4)
        finally:
            remove_token_weights(lam)
    assert "token_weights" not in lam.state_dict()
    for i, mask in enumerate(features["attention_mask"].bool()):
        ids = features["input_ids"][i][mask].tolist()
        capped = reference_mean(plain[i][mask], ids, 2, torch.ones_like(id_weights), 24)
        want = reference_mean(plain[i][mask], ids, 2, id_weights, 24)
        torch.testing.assert_close(weighted[i][mask].double().mean(0), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[i].double(), torch.nn.functional.normalize(want, dim=0), rtol=1e-5, atol=1e-6)
        if len(ids) <= 24:  # short: the repeat cap's mean, as without the weights
            torch.testing.assert_close(want, capped, rtol=0, atol=1e-12)
        else:
            assert (want - capped).abs().max() > 1e-4, len(ids)


def test_save_and_load_keep_the_weights(st, tmp_path):
    from sentence_transformers import SentenceTransformer

    import lam_embed  # noqa: F401

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(1)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS[:8]) for _ in range(12)) for _ in range(50)) + "\n")
    st.save(str(tmp_path / "plain"))
    main([str(tmp_path / "plain"), "--sentences", str(corpus), "--smoothing", "0.01", "--min-tokens", "16",
          "--output", str(tmp_path / "weighted")])
    loaded = SentenceTransformer(str(tmp_path / "weighted"), device="cpu")
    lam = loaded[0].auto_model
    assert lam.config.token_weights_min_tokens == 16
    counts = corpus_token_counts(st.tokenizer, corpus.read_text().splitlines(), lam.config.vocab_size)
    torch.testing.assert_close(lam.token_weights, sif_weights(counts, 0.01))
    ids = st.tokenizer.convert_tokens_to_ids(["river", "lamp"])  # in the corpus, not in it
    assert lam.token_weights[ids[0]] < 0.9 < lam.token_weights[ids[1]]
    texts = ["a short one", " ".join(rng.choice(WORDS) for _ in range(120))]
    got = loaded.encode(texts)
    plain = SentenceTransformer(str(tmp_path / "plain"), device="cpu").encode(texts)
    np.testing.assert_allclose(got[0], plain[0], atol=1e-6, rtol=0)  # under 16 tokens: as before
    assert np.abs(got[1] - plain[1]).max() > 1e-3


def test_counts_and_sif_weights():
    class Tokenizer:
        def __call__(self, texts, add_special_tokens):
            assert not add_special_tokens
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    counts = corpus_token_counts(Tokenizer(), ["1 2 2", "3 2", ""], vocab_size=5, batch_size=2)
    assert counts.tolist() == [0, 1, 3, 1, 0]
    weights = sif_weights(counts, 0.1)
    share = (np.array([0, 1, 3, 1, 0]) + 1) / (5 + 5)
    np.testing.assert_allclose(weights.numpy(), 0.1 / (0.1 + share), rtol=1e-6)
    with pytest.raises(ValueError, match="smoothing must be positive, got 0"):
        sif_weights(counts, 0)


def test_errors(st):
    lam = st[0].auto_model
    with pytest.raises(ValueError, match=r"weights must have shape \(30522,\)"):
        set_token_weights(lam, torch.ones(10), 8)
    with pytest.raises(ValueError, match="weights must be finite and positive"):
        set_token_weights(lam, torch.zeros(lam.config.vocab_size), 8)
    with pytest.raises(ValueError, match="token_weights_min_tokens must be None or an integer >= 0, got -1"):
        set_token_weights(lam, torch.ones(lam.config.vocab_size), -1)
    from lam_embed import LAMConfig, LAMModel

    bare = LAMModel(LAMConfig(num_hidden_layers=1, vocab_size=64, hidden_size=64, num_attention_heads=2,
                              intermediate_size=64))
    bare.config.token_weights_min_tokens = 4
    with pytest.raises(ValueError, match="has no token_weights"):
        bare(input_ids=torch.ones(1, 6, dtype=torch.long))


def test_streaming_gives_the_one_pass_embedding_with_weights(st):
    import lam_embed

    lam = st[0].auto_model
    rng = random.Random(4)
    pieces = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (30, 120, 60)]
    id_weights = torch.rand(lam.config.vocab_size, generator=torch.Generator().manual_seed(2)) + 0.05
    set_token_weights(lam, id_weights, 24)
    try:
        got = lam_embed.encode_document(st, pieces, segment_tokens=32)
        np.testing.assert_allclose(got, one_pass_embedding(st, pieces), atol=2e-6, rtol=0)
    finally:
        remove_token_weights(lam)
