"""The learned pooling gate of long inputs (LAMConfig.pooling_gate_min_tokens): at zero it
changes nothing, set it gives a mean written out row by row, short inputs keep their
embeddings bit for bit, and save / load, streaming and the training option keep it."""

import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import one_pass_embedding, unweighted_rows

WORDS = "the a river house blue seven quiet old road bird sang ran below over hill lamp".split()
MIN_TOKENS = 24


def _texts(seed=0, lengths=(150, 60, 40, 20, 5)):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


@pytest.fixture(scope="module")
def gated():
    """The capped test model and a copy with a pooling gate from MIN_TOKENS tokens, its
    logits set to seeded values (as after training)."""
    from conftest import small_lam_sentence_transformer

    import lam_embed

    st, _ = small_lam_sentence_transformer(delta_net_noise=0.05, chunk_size=16, token_repeat_cap=2)
    st.max_seq_length = 512
    lam = st[0].auto_model
    with_gate = lam.with_pooling_gate(MIN_TOKENS)
    untrained = lam_embed.build_sentence_transformer(with_gate)
    untrained.max_seq_length = 512
    trained_lam = lam.with_pooling_gate(MIN_TOKENS)
    torch.manual_seed(1)
    with torch.no_grad():
        trained_lam.pooling_gate.weight.normal_(std=0.5)
        trained_lam.pooling_gate.bias.fill_(3.0)  # no effect: the pooling renormalises
    trained = lam_embed.build_sentence_transformer(trained_lam)
    trained.max_seq_length = 512
    return st, untrained, trained


def reference_mean(rows, ids, cap, gate, min_tokens):
    """The pooled mean, row by row: weight = the repeat cap's, times exp(s * (w . row + b)),
    s the ramp's share for this many tokens."""
    occurrences = Counter(ids)
    share = min(1.0, max(0.0, math.log(len(ids) / min_tokens) / math.log(4.0)))
    w, b = gate.weight[0].detach().double(), float(gate.bias.detach()[0])
    weights = [min(1.0, cap / occurrences[token]) * math.exp(share * (float(w @ row.double()) + b))
               for token, row in zip(ids, rows)]
    return sum(weight * row.double() for weight, row in zip(weights, rows)) / sum(weights)


def test_a_gate_at_zero_changes_no_embedding(gated):
    st, untrained, _ = gated
    assert untrained[0].auto_model.config.pooling_gate_min_tokens == MIN_TOKENS
    assert torch.count_nonzero(untrained[0].auto_model.pooling_gate.weight) == 0
    texts = _texts()
    np.testing.assert_allclose(untrained.encode(texts), st.encode(texts), atol=1e-7, rtol=0)


def test_the_gated_mean_matches_the_written_out_mean(gated):
    st, _, trained = gated
    lam = trained[0].auto_model
    texts = _texts(1)
    features = trained.tokenize(texts)
    plain = unweighted_rows(st[0].auto_model, features)  # the same layers, no gate
    with torch.no_grad():
        weighted = lam(**features).last_hidden_state
        capped = st[0].auto_model(**features).last_hidden_state
    pooled = trained.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=5)
    for i, mask in enumerate(features["attention_mask"].bool()):
        ids = features["input_ids"][i][mask].tolist()
        want = reference_mean(plain[i][mask], ids, 2, lam.pooling_gate, MIN_TOKENS)
        torch.testing.assert_close(weighted[i][mask].double().mean(0), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[i].double(), torch.nn.functional.normalize(want, dim=0), rtol=1e-5, atol=1e-6)
        if len(ids) <= MIN_TOKENS:  # short: exactly the model without a gate
            assert torch.equal(weighted[i], capped[i]), len(ids)
        else:
            assert (want - capped[i][mask].double().mean(0)).abs().max() > 1e-4, len(ids)


def test_save_and_load_keep_the_gate(gated, tmp_path):
    from sentence_transformers import SentenceTransformer

    import lam_embed  # noqa: F401

    _, _, trained = gated
    texts = _texts(2, (200, 8))
    trained.save(str(tmp_path / "gated"))
    loaded = SentenceTransformer(str(tmp_path / "gated"), device="cpu")
    gate = loaded[0].auto_model.pooling_gate
    assert loaded[0].auto_model.config.pooling_gate_min_tokens == MIN_TOKENS
    assert torch.equal(gate.weight, trained[0].auto_model.pooling_gate.weight)
    np.testing.assert_allclose(loaded.encode(texts), trained.encode(texts), atol=1e-6, rtol=0)


def test_a_release_keeps_the_gate(gated, tmp_path):
    from lam_embed.release import load_release, save_release
    from lam_embed.teacher import resolve_teacher_path

    _, _, trained = gated
    lam = trained[0].auto_model
    save_release(lam, tmp_path / "release", {"command": "test"}, teacher=resolve_teacher_path())
    loaded = load_release(tmp_path / "release")
    assert loaded.config.pooling_gate_min_tokens == MIN_TOKENS
    torch.testing.assert_close(loaded.pooling_gate.weight, lam.pooling_gate.weight.half().float())


def test_streaming_gives_the_one_pass_embedding(gated):
    import lam_embed

    _, _, trained = gated
    rng = random.Random(3)
    pieces = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (6, 40, 90, 7, 150)]
    document = lam_embed.start_document(trained, segment_tokens=32)
    for number, piece in enumerate(pieces, 1):
        document.append(piece)
        np.testing.assert_allclose(document.embedding, one_pass_embedding(trained, pieces[:number]), atol=2e-6, rtol=0)
    assert document.tokens > 4 * MIN_TOKENS


def test_a_second_gate_and_bad_settings_are_refused(gated):
    from lam_embed import LAMConfig

    _, _, trained = gated
    with pytest.raises(ValueError, match="has a pooling gate already"):
        trained[0].auto_model.with_pooling_gate(8)
    for value in (-1, 2.5, True):
        with pytest.raises(ValueError, match=re.escape(
                f"LAMConfig.pooling_gate_min_tokens must be None or an integer >= 0, got {value!r}")):
            LAMConfig(pooling_gate_min_tokens=value)
