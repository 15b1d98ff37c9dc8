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
    # A batch padded to at most the threshold (no sample can be long), one padded wider, long ones.
    for lengths, width, reference in (([4, 9], THRESHOLD, short), ([4, 9, THRESHOLD], 40, short),
                                      ([THRESHOLD + 1, 30], 40, long_)):
        ids, mask = _batch(lengths, width)
        with torch.no_grad():
            torch.testing.assert_close(routed(input_ids=ids, attention_mask=mask).last_hidden_state,
                                       reference(input_ids=ids, attention_mask=mask).last_hidden_state,
                                       rtol=0, atol=0)


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


def test_streaming_reads_each_document_with_the_layers_of_its_length():
    """A streamed document of at most long_input_min_tokens tokens is read by the first layers
    in one forward, a longer one by the long-input layers segment by segment; either way its
    embedding is the one-pass embedding, also when a document grows from short to long."""
    import numpy as np

    import lam_embed
    from conftest import one_pass_embedding, small_lam_sentence_transformer

    st, _ = small_lam_sentence_transformer(long_input_min_tokens=40)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # two distinct sets, as after training the second
        for param in st[0].auto_model.long_input_layers.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    short = ["The river runs under the old green house."]
    long_ = short + [f"Part {i}: the music plays loud and the dog runs over the quiet river." for i in range(30)]
    for pieces in (short, long_):
        np.testing.assert_allclose(lam_embed.encode_document(st, pieces, segment_tokens=128),
                                   one_pass_embedding(st, pieces), atol=2e-5)
    document = lam_embed.start_document(st, segment_tokens=128)
    document.append(short[0])
    np.testing.assert_allclose(document.embedding, one_pass_embedding(st, short), atol=2e-5)
    for piece in long_[1:]:
        document.append(piece)
    np.testing.assert_allclose(document.embedding, one_pass_embedding(st, long_), atol=2e-5)
    both = lam_embed.encode_documents(st, [short, long_, short], batch_size=3, segment_tokens=128)
    np.testing.assert_allclose(both, np.stack([one_pass_embedding(st, d) for d in (short, long_, short)]), atol=2e-5)
    st[0].auto_model.config.long_input_min_tokens = 200
    try:
        with pytest.raises(ValueError, match="segment_tokens must exceed the model's long_input_min_tokens"):
            lam_embed.start_document(st, segment_tokens=128)
    finally:
        st[0].auto_model.config.long_input_min_tokens = 40


def test_on_the_gpu_graphs_of_each_set_give_that_sets_output(models):
    """On CUDA (Triton kernels, CUDA graphs replayed from the second sighting of a shape): a
    shape seen with both sets keeps a graph for each, and every row equals its one-set model."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    routed, short, long_ = (model.cuda().to(torch.bfloat16) for model in models)
    try:
        for model in (routed, short, long_):
            model.config.delta_impl = "auto"
            model.config.cuda_graphs = True
        # The same shape (3 x 40) all short, all long, then mixed.
        for lengths in ([5, 9, THRESHOLD], [THRESHOLD + 1, 30, 40], [5, 40, THRESHOLD + 2]):
            ids, mask = (t.cuda() for t in _batch(lengths))
            with torch.inference_mode():
                for _ in range(3):  # eager, capture, replay
                    got = routed(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                want_short = short(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                want_long = long_(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            for row, n in enumerate(lengths):
                want = want_long if n > THRESHOLD else want_short
                torch.testing.assert_close(got[row, :n], want[row, :n], rtol=2e-2, atol=2e-2)
    finally:
        for model in models:
            model.cpu().float()
            model.config.delta_impl = "chunk"
