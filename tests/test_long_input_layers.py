"""LAMConfig.long_input_min_tokens: samples longer than the threshold are read by a second set
of layers, the others by the first; checked against plain one-set models holding each set."""

import pytest
import torch

from lam_embed import LAMConfig, LAMModel

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=96, vocab_size=120,
             chunk_size=8)
THRESHOLD = 12


@pytest.fixture(scope="module")
def models():
    """A routed model with random, distinct sets of layers, and one-set models holding each."""
    torch.manual_seed(0)
    routed = LAMModel(LAMConfig(long_input_min_tokens=THRESHOLD, **SMALL)).eval()
    state = routed.state_dict()
    shared = {k: v for k, v in state.items() if not k.startswith(("layers.", "long_input_layers."))}
    short, long_ = LAMModel(LAMConfig(**SMALL)).eval(), LAMModel(LAMConfig(**SMALL)).eval()
    short.load_state_dict({**shared, **{k: v for k, v in state.items() if k.startswith("layers.")}})
    long_.load_state_dict({**shared, **{k.removeprefix("long_input_"): v for k, v in state.items()
                                        if k.startswith("long_input_layers.")}})
    return routed, short, long_


def _batch(lengths, width=40):
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, SMALL["vocab_size"], (n,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("delta_impl", ["chunk", "auto"])
def test_each_sample_is_read_by_the_layers_of_its_length(models, delta_impl):
    routed, short, long_ = models
    lengths = [5, THRESHOLD, THRESHOLD + 1, 40, 3]  # up to the threshold: the first set
    ids, mask = _batch(lengths)
    for model in models:
        model.config.delta_impl = delta_impl
    with torch.no_grad():
        got = routed(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        want_short = short(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        want_long = long_(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for row, n in enumerate(lengths):
        want, other = (want_long, want_short) if n > THRESHOLD else (want_short, want_long)
        valid = slice(0, n)
        torch.testing.assert_close(got.last_hidden_state[row, valid], want.last_hidden_state[row, valid],
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got.last_hidden_state[row, valid], other.last_hidden_state[row, valid], atol=1e-3)
        for layer, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
            torch.testing.assert_close(g[row, valid], w[row, valid], rtol=1e-5, atol=1e-5, msg=f"layer {layer}")


def test_a_batch_of_one_kind_equals_the_one_set_model(models):
    routed, short, long_ = models
    for model in models:
        model.config.delta_impl = "chunk"
    for lengths, reference in (([4, 9, THRESHOLD], short), ([THRESHOLD + 1, 30], long_)):
        ids, mask = _batch(lengths)
        with torch.no_grad():
            torch.testing.assert_close(routed(input_ids=ids, attention_mask=mask).last_hidden_state,
                                       reference(input_ids=ids, attention_mask=mask).last_hidden_state,
                                       rtol=0, atol=0)


def test_streaming_a_model_with_long_input_layers_is_refused(models):
    routed = models[0]
    ids, mask = _batch([20])
    with pytest.raises(NotImplementedError, match="long_input_min_tokens"):
        routed(input_ids=ids, attention_mask=mask, use_cache=True)


def test_the_threshold_is_checked():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="long_input_min_tokens must be None or an integer >= 0"):
            LAMConfig(long_input_min_tokens=bad)


def test_save_and_load_keep_both_sets(models, tmp_path):
    routed = models[0]
    routed.save_pretrained(tmp_path)
    loaded = LAMModel.from_pretrained(tmp_path).eval()
    assert loaded.config.long_input_min_tokens == THRESHOLD
    ids, mask = _batch([6, 25])
    routed.config.delta_impl = loaded.config.delta_impl = "chunk"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   routed(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)


def test_streaming_names_what_it_cannot_do(models):
    import lam_embed

    st = lam_embed.build_sentence_transformer(models[0], tokenizer=None, device="cpu")
    with pytest.raises(ValueError, match="streaming does not support a model with long-input layers"):
        lam_embed.encode_document(st, "a few words")
