"""Packed CPU inference (lam_embed/inference/packing.py, LAMConfig.packed_inference): the
valid tokens of a right-padded batch run without padding and give what the padded forward
gives, sample by sample."""

import pytest
import torch

import lam_embed
from lam_embed import LAMConfig, LAMModel, build_sentence_transformer
from lam_embed.inference.packing import PackedBatch
from lam_embed.layers.dual_state_delta_net import causal_depthwise_conv

from tests.test_layer import make_layer

numba_ops = pytest.importorskip("lam_embed.ops.numba", reason="numba is not installed")


def right_padded(lengths):
    return torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]


def test_packed_batch_layout_and_round_trip():
    mask = right_padded([3, 1, 4])
    packed = PackedBatch.from_mask(mask)
    assert packed.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert packed.starts.tolist() == [0, 3, 4] and packed.lengths.tolist() == [3, 1, 4]
    assert packed.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    x = torch.randn(3, 4, 5)
    restored = packed.unpack(packed.pack(x))
    assert torch.equal(restored, x * mask[..., None])  # valid rows back in place, zeros on padding


@pytest.mark.parametrize("mask, why", [
    (torch.ones(2, 4, dtype=torch.bool), "no padding to drop"),
    (torch.tensor([[True, False, True, False]]), "a gap"),
    (torch.tensor([[False, True, True, True], [True] * 4]), "padding first"),
])
def test_batches_that_keep_their_padding(mask, why):
    assert PackedBatch.from_mask(mask) is None, why


def test_packed_convolution_reads_no_other_sample():
    """Against the convolution of each sample on its own, for samples shorter than the kernel too."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 2, 9, 3]
    weight = torch.randn(6, 1, 4, generator=g)
    rows = torch.randn(sum(lengths), 10, generator=g)  # 10 columns: the convolution reads the first 6
    packed = PackedBatch.from_mask(right_padded(lengths))
    out = numba_ops.packed_causal_conv(rows, weight, packed.positions)
    expected = torch.cat([causal_depthwise_conv(sample[None, :, :6], weight)[0]
                          for sample in rows.split(lengths)])
    assert out.shape == (sum(lengths), 6)
    assert (out - expected).abs().max() <= 1e-6


def test_numba_kernel_on_packed_rows_equals_padded():
    """The delta rule, norm and gate on packed rows equal the padded layout's valid rows:
    samples of one, two and three chunks."""
    from lam_embed.layers.dual_state_delta_net import delta_net_features

    net = make_layer()
    C, H = net.config.chunk_size, net.num_heads
    lengths = [2 * C + 30, 1, C, 17]
    mask = right_padded(lengths)
    x = torch.randn(len(lengths), max(lengths), 64, generator=torch.Generator().manual_seed(1))
    packed = PackedBatch.from_mask(mask)
    with torch.no_grad():
        weight, bias, conv = net.input_projection() + (torch.cat([net.q_conv.weight, net.k_conv.weight,
                                                                  net.v_conv.weight]),)
        padded = numba_ops.delta_rule_layer(*delta_net_features(x, mask, weight, bias, conv, H), mask, net.flux,
                                            net.norm_weight, net.eps, C)
        rows = delta_net_features(packed.pack(x), None, weight, bias, conv, H, packed_positions=packed.positions)
        out = numba_ops.delta_rule_layer(*rows, None, net.flux, net.norm_weight, net.eps, C,
                                         segments=(packed.starts, packed.lengths))
    assert out.shape == (sum(lengths), 64)
    assert (out - packed.pack(padded)).abs().max() <= 1e-5 * padded.abs().max()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LAMConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
                       vocab_size=500, token_repeat_cap=2)
    lam = LAMModel(config).eval()
    with torch.no_grad():
        for layer in lam.layers:
            torch.nn.init.normal_(layer.delta_net.flux.bilinear, std=0.3)
    return lam


def forward(lam, ids, mask, types, packed: bool):
    lam.config.packed_inference = packed
    try:
        with torch.no_grad():
            return lam(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    finally:
        lam.config.packed_inference = True


def test_packed_forward_equals_padded_forward(model):
    """Mixed lengths (one to three chunks, one token), token types, repeated ids under the
    repeat cap: the valid rows agree to float32 rounding, the padded rows are zero."""
    C = model.config.chunk_size
    lengths = [2 * C + 7, 1, 40, C + 1, 40]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (len(lengths), max(lengths)), generator=g)  # many repeats: the cap acts
    mask = right_padded(lengths).long()
    ids = ids * mask
    types = (torch.rand(ids.shape, generator=g) < 0.3).long() * mask
    with torch.no_grad():
        assert model.select_backend(ids).layer_code == "numba"
    padded = forward(model, ids, mask, types, packed=False)
    packed = forward(model, ids, mask, types, packed=True)
    valid = mask.bool()[..., None]
    assert ((packed - padded) * valid).abs().max() <= 1e-5 * padded.abs().max()
    assert not bool((packed * ~valid).any())
    # Each sample alone (no padding at all, so no packing) gives the same rows.
    for row, n in enumerate(lengths):
        alone = forward(model, ids[row:row + 1, :n], mask[row:row + 1, :n], types[row:row + 1, :n], packed=True)
        assert (alone[0] - packed[row, :n]).abs().max() <= 1e-5 * padded.abs().max()


def test_encode_packed_equals_padded():
    """SentenceTransformer.encode of texts of mixed lengths (an empty one, one past a chunk)
    gives the same embeddings, in the input order, packed or not."""
    torch.manual_seed(0)
    lam = lam_embed.from_teacher().eval()
    st = build_sentence_transformer(lam, max_seq_length=512, device="cpu")
    texts = ["A man is playing a guitar.", "", "word " * 150, "Someone plays an instrument on a stage tonight.", "x"]
    lam.config.packed_inference = False
    padded = st.encode(texts, batch_size=4)
    lam.config.packed_inference = True
    packed = st.encode(texts, batch_size=4)
    assert abs(packed - padded).max() <= 1e-5
    alone = [st.encode([t])[0] for t in texts]
    assert abs(packed - alone).max() <= 1e-5
