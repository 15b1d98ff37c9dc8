"""Outlier pooling of long inputs (LAMConfig.outlier_pooling_temperature): against a
computation written out row by row, short inputs unchanged bit for bit, save and load, and
the errors."""

import math
import re
import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import one_pass_embedding, unweighted_rows

WORDS = "the a river house blue seven quiet old road bird sang ran below over hill lamp".split()
MIN_TOKENS = 24


@pytest.fixture
def st(capped_st):
    return capped_st


def reference_mean(rows, ids, cap, temperature, min_tokens):
    """The pooled mean, row by row: weight = the repeat cap's, times exp(-t * s * cos(row, m)),
    m the capped mean, s the ramp's share for this many tokens."""
    occurrences = Counter(ids)
    cap_weights = [min(1.0, cap / occurrences[token]) for token in ids]
    rows = [row.double() for row in rows]
    mean = sum(w * row for w, row in zip(cap_weights, rows)) / sum(cap_weights)
    share = min(1.0, max(0.0, math.log(len(ids) / min_tokens) / math.log(4.0)))
    weights = [w * math.exp(-temperature * share * float(torch.nn.functional.cosine_similarity(row, mean, dim=0)))
               for w, row in zip(cap_weights, rows)]
    return sum(w * row for w, row in zip(weights, rows)) / sum(weights)


def _set(lam, temperature, min_tokens=MIN_TOKENS):
    lam.config.outlier_pooling_temperature = temperature
    lam.config.outlier_pooling_min_tokens = min_tokens


def test_outlier_pooling_matches_the_written_out_mean(st):
    lam = st[0].auto_model
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (150, 60, 40, 20, 5)]
    features = st.tokenize(texts)
    plain = unweighted_rows(lam, features)  # weighted below by hand
    with torch.no_grad():
        capped = lam(**features).last_hidden_state
        _set(lam, 10.0)
        try:
            weighted = lam(**features).last_hidden_state
            pooled = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=5)
        finally:
            _set(lam, None, 512)
    for i, mask in enumerate(features["attention_mask"].bool()):
        ids = features["input_ids"][i][mask].tolist()
        want = reference_mean(plain[i][mask], ids, 2, 10.0, MIN_TOKENS)
        torch.testing.assert_close(weighted[i][mask].double().mean(0), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[i].double(), torch.nn.functional.normalize(want, dim=0), rtol=1e-5, atol=1e-6)
        if len(ids) <= MIN_TOKENS:  # short: exactly the repeat cap's output
            assert torch.equal(weighted[i], capped[i]), len(ids)
        else:
            assert (want - capped[i][mask].double().mean(0)).abs().max() > 1e-4, len(ids)


def test_outlier_rows_weigh_more_the_longer_the_input(st):
    """One line unlike the rest: its weight in the pooled mean grows from the plain share at
    the threshold to far more at 4 times it."""
    lam = st[0].auto_model
    odd = "seven blue lamps sang below the quiet hill"
    shares = []
    for n in (MIN_TOKENS, 2 * MIN_TOKENS, 4 * MIN_TOKENS, 16 * MIN_TOKENS):
        filler = " ".join(["the old road ran over the river"] * (n // 7))
        features = st.tokenize([filler + " " + odd])
        with torch.no_grad():
            lam.config.token_repeat_cap = None
            try:
                plain = lam(**features).last_hidden_state[0]
                _set(lam, 10.0)
                weighted = lam(**features).last_hidden_state[0]
            finally:
                lam.config.token_repeat_cap = 2
                _set(lam, None, 512)
        ratio = (weighted.norm(dim=-1) / plain.norm(dim=-1))  # each row's weight relative to the mean's
        odd_rows = slice(-9, -1)  # the odd line's tokens, before [SEP]
        shares.append(float(ratio[odd_rows].mean() / ratio.mean()))
    assert shares[0] < shares[1] < shares[2] and abs(shares[3] - shares[2]) < 0.25 * shares[2], shares


def test_save_and_load_keep_the_setting(st, tmp_path):
    from sentence_transformers import SentenceTransformer

    import lam_embed  # noqa: F401

    lam = st[0].auto_model
    texts = ["a short one", " ".join(random.Random(2).choice(WORDS) for _ in range(200))]
    plain = st.encode(texts)
    _set(lam, 8.0, 32)
    try:
        st.save(str(tmp_path / "outlier"))
        want = st.encode(texts)
    finally:
        _set(lam, None, 512)
    loaded = SentenceTransformer(str(tmp_path / "outlier"), device="cpu")
    assert loaded[0].auto_model.config.outlier_pooling_temperature == 8.0
    assert loaded[0].auto_model.config.outlier_pooling_min_tokens == 32
    np.testing.assert_allclose(loaded.encode(texts), want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(want[0], plain[0])  # under 32 tokens: as before
    assert np.abs(want[1] - plain[1]).max() > 1e-3


@pytest.mark.parametrize("name, value, message", [
    ("outlier_pooling_temperature", 0, "must be None or a positive number, got 0"),
    ("outlier_pooling_temperature", -1.0, "must be None or a positive number, got -1.0"),
    ("outlier_pooling_temperature", float("nan"), "must be None or a positive number, got nan"),
    ("outlier_pooling_temperature", True, "must be None or a positive number, got True"),
    ("outlier_pooling_temperature", "10", "must be None or a positive number, got '10'"),
    ("outlier_pooling_min_tokens", -1, "must be an integer >= 0, got -1"),
    ("outlier_pooling_min_tokens", 2.5, "must be an integer >= 0, got 2.5"),
])
def test_config_errors_name_the_field(name, value, message):
    from lam_embed import LAMConfig

    with pytest.raises(ValueError, match=re.escape(f"LAMConfig.{name} {message}")):
        LAMConfig(**{name: value})


def test_streaming_gives_the_one_pass_embedding(st, tmp_path):
    """A streamed document (segments of 32 tokens, saved and loaded midway, read between
    appends) keeps its rows and gives the one-pass embedding of the same ids, short and long."""
    import lam_embed

    lam = st[0].auto_model
    rng = random.Random(3)
    pieces = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (6, 40, 90, 7, 150)]
    _set(lam, 10.0)
    try:
        document = lam_embed.start_document(st, segment_tokens=32)
        for number, piece in enumerate(pieces, 1):
            document.append(piece)
            if number == 3:
                document.save(tmp_path / "doc.state")
                document = lam_embed.DocumentState.load(tmp_path / "doc.state", st)
            want = one_pass_embedding(st, pieces[:number])
            np.testing.assert_allclose(document.embedding, want, atol=2e-6, rtol=0)
        assert document.tokens > 4 * MIN_TOKENS  # the weighting applied in full at the end
        np.testing.assert_allclose(lam_embed.encode_documents(st, [pieces, pieces[:2]], segment_tokens=32),
                                   np.stack([one_pass_embedding(st, pieces), one_pass_embedding(st, pieces[:2])]), atol=2e-6, rtol=0)
    finally:
        _set(lam, None, 512)
