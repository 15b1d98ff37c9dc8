"""int8 matrix products on CPU (LAMConfig.cpu_int8, lam_embed/inference/int8.py): the kernel
path against an exact simulation of its quantisation, row independence, the released
model's embeddings against float32's, and the switch itself."""

import pytest
import torch
import torch.nn.functional as F

from lam_embed.backends import Backend, select_backend
from lam_embed.configuration_lam import LAMConfig
from lam_embed.inference import int8

pytestmark = pytest.mark.skipif(not int8.supported(), reason="this torch has no oneDNN int8 products")


def simulated_int8_linear(x, weight, bias, input_scale):
    """What int8_linear computes, in float64 from the description in int8.py: smoothing,
    weights rounded per output row to [-levels, levels] (int8.weight_levels()), each row of x
    scaled to [-1, 1] and rounded to 255 levels around 128, exact sums, scales applied back."""
    x, weight = x.double(), weight.double()
    if input_scale is not None:
        smoothing = (input_scale.double().clamp(min=1e-5) ** 0.5 / weight.abs().amax(0).clamp(min=1e-5) ** 0.5)
        x, weight = x / smoothing, weight * smoothing
    weight_scale = weight.abs().amax(1, keepdim=True) / int8.weight_levels()
    weight_levels = torch.round(weight / weight_scale)
    magnitude = x.abs().amax(1, keepdim=True)
    x_levels = torch.clamp(torch.round(x / magnitude * 127) + 128, 0, 255) - 128
    y = (x_levels @ weight_levels.t()) * (magnitude / 127) * weight_scale.t()
    return y if bias is None else y + bias.double()


def outlier_inputs(seed=0, rows=300, columns=384, outputs=640):
    """Rows and channels far larger than the rest, as a LayerNorm output has them, and
    weights whose large values would saturate 8-bit pairs on CPUs without VNNI."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=g)
    x[:, :3] *= 15
    x[::37] *= 4
    weight = torch.randn(outputs, columns, generator=g) * 0.05
    weight[:, 5] *= 10
    bias = torch.randn(outputs, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_linear_equals_a_simulation_of_its_quantisation(smoothed):
    x, weight, bias = outlier_inputs()
    scale = x.abs().amax(0) if smoothed else None
    got = int8.int8_linear(x, int8.pack_linear(weight, bias, input_scale=scale))
    expected = simulated_int8_linear(x, weight, bias, scale)
    exact = F.linear(x, weight, bias).double()
    # A value at a rounding boundary may land one level apart in float32: a few 1e-4 at most.
    # Saturated int16 sums or another rounding would be off by the quantisation error itself.
    assert (got.double() - expected).norm() <= 1e-3 * expected.norm()
    assert (got.double() - exact).norm() <= 0.05 * exact.norm()
    assert (got.double() - exact).norm() >= 10 * (got.double() - expected).norm()  # int8 indeed


def test_without_exact_8_bit_sums_the_weights_take_7_bits():
    """oneDNN held to AVX2 (no VNNI: uint8 x int8 pairs summed into int16, which saturate)
    makes weight_levels() 63, and the products still equal the simulation at 63 levels, on
    weights that would saturate at 127. With all its instructions on a VNNI CPU, 127."""
    import os
    import subprocess
    import sys

    code = """
import torch
from lam_embed.inference import int8
import test_int8
x, weight, bias = test_int8.outlier_inputs()
got = int8.int8_linear(x, int8.pack_linear(weight, bias)).double()
expected = test_int8.simulated_int8_linear(x, weight, bias, None)
print(int8.weight_levels(), float((got - expected).norm() / expected.norm()))
"""
    tests = os.path.dirname(__file__)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    levels, relative_error = done.stdout.split()
    assert int(levels) == int8.WEIGHT_LEVELS_SUMMED_IN_PAIRS and float(relative_error) <= 1e-3
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            vnni = "vnni" in f.read()
        assert int8.weight_levels() == (int8.WEIGHT_LEVELS_EXACT if vnni else int8.WEIGHT_LEVELS_SUMMED_IN_PAIRS)


def reference_levels(rows):
    """uint8 levels of each row of ``rows`` scaled to [-1, 1]: round(127 x / max |x|) + 128, and the maxima."""
    magnitude = rows.abs().amax(1)
    return torch.round(rows / magnitude[:, None] * 127) + 128, magnitude


def assert_levels_match(levels, magnitude, rows):
    """Levels as reference_levels gives them for float64 ``rows``: a value within float32
    rounding of a level boundary may land one level away, nothing further."""
    expected, expected_magnitude = reference_levels(rows)
    torch.testing.assert_close(magnitude.double(), expected_magnitude, rtol=1e-5, atol=0)
    difference = (levels.double() - expected).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


def test_rows_to_levels_against_float64():
    from lam_embed.ops import numba as kernels

    x, _, _ = outlier_inputs(seed=3)
    column_scale = torch.rand(x.shape[1]) + 0.5
    levels, magnitude = kernels.rows_to_levels(x, column_scale)
    assert levels.dtype == torch.uint8 and levels.min() >= 1
    assert_levels_match(levels, magnitude, x.double() * column_scale.double())


def test_the_magnitude_is_the_largest_in_any_column():
    """Each row's magnitude is its largest |value x column scale| wherever that sits: in
    every column of rows whose width is a multiple of the kernel's eight running maxima or
    not (the last columns are a loop of their own)."""
    from lam_embed.ops import numba as kernels

    for width in (8, 13, 1536, 1541):
        x = torch.rand(width, width) * 0.5
        x[torch.arange(width), torch.arange(width)] = -3.0  # row r's largest in column r
        column_scale = torch.ones(width)
        column_scale[-1] = 2.0
        _, magnitude = kernels.rows_to_levels(x, column_scale)
        expected = torch.full((width,), 3.0)
        expected[-1] = 6.0
        assert torch.equal(magnitude, expected), width


def test_gelu_pass_against_float64():
    """The pass between the FFN's products: rows scaled back, bias, GELU (erf's, through a
    polynomial), column scale, levels; on values from -300 to 300, where the polynomial
    overflows to inf and erf must come out as +-1, and near 0."""
    from lam_embed.ops import numba as kernels

    g = torch.Generator().manual_seed(4)
    y = torch.randn(200, 1536, generator=g)
    y[0, :6] = torch.tensor([0.0, 1e-6, -1e-6, 60.0, -80.0, 300.0])
    y[1] *= 50
    magnitude_in, bias = torch.rand(200, generator=g) * 4 + 0.1, torch.randn(1536, generator=g)
    column_scale = torch.rand(1536, generator=g) + 0.5
    pre_activation = y.double() * magnitude_in.double()[:, None] + bias.double()
    gelu = F.gelu(pre_activation)
    levels, magnitude = kernels.gelu_rows_to_levels(y.clone(), magnitude_in, bias, column_scale)
    assert_levels_match(levels, magnitude, gelu * column_scale.double())
    # The GELU itself, read back from the overwritten rows: erf's to its 3e-7.
    written = y.clone()
    kernels.gelu_rows_to_levels(written, magnitude_in, bias, column_scale)
    torch.testing.assert_close(written.double(), gelu, rtol=1e-5, atol=1e-6)


def test_a_nan_shows_in_its_row_only():
    """A NaN in a row of the input makes that row of the output NaN (the levels cannot carry
    it), in both passes; the other rows keep their values."""
    x, weight, bias = outlier_inputs(seed=6, rows=8, outputs=1536)
    x[3, 10] = float("nan")
    inner = int8.pack_linear(weight, bias)
    outer = int8.pack_linear(torch.randn(384, 1536) * 0.03, torch.randn(384))
    clean = x.clone()
    clean[3] = 0
    for exact_gelu in (True, False):
        y = int8.int8_feed_forward(x, inner, outer, F.gelu, exact_gelu=exact_gelu)
        assert y[3].isnan().all()
        rows = torch.arange(8) != 3
        torch.testing.assert_close(y[rows], int8.int8_feed_forward(clean, inner, outer, F.gelu,
                                                                   exact_gelu=exact_gelu)[rows])


def test_int8_feed_forward_equals_its_two_products():
    """The fused GELU pass gives what the two int8 products with GELU between them give."""
    x, weight, bias = outlier_inputs(seed=5, outputs=1536)
    weight_out, bias_out = torch.randn(384, 1536) * 0.03, torch.randn(384)
    inner = int8.pack_linear(weight, bias, input_scale=x.abs().amax(0))
    outer = int8.pack_linear(weight_out, bias_out, input_scale=torch.rand(1536) + 0.5)
    fused = int8.int8_feed_forward(x.reshape(3, 100, -1), inner, outer, F.gelu, exact_gelu=True)
    assert fused.shape == (3, 100, 384)
    unfused = int8.int8_feed_forward(x, inner, outer, F.gelu, exact_gelu=False)
    torch.testing.assert_close(fused.reshape(300, -1), unfused, rtol=0, atol=1e-3 * unfused.abs().max().item())
    exact = F.linear(F.gelu(F.linear(x, weight, bias)), weight_out, bias_out)
    assert (fused.reshape(300, -1) - exact).norm() <= 0.05 * exact.norm()


def test_smoothing_with_the_channel_sizes_lowers_the_error():
    x, weight, bias = outlier_inputs(seed=1)
    exact = F.linear(x, weight, bias)
    plain = int8.int8_linear(x, int8.pack_linear(weight, bias))
    smoothed = int8.int8_linear(x, int8.pack_linear(weight, bias, input_scale=x.abs().amax(0)))
    assert (smoothed - exact).norm() < 0.8 * (plain - exact).norm()


def test_a_rows_result_does_not_depend_on_the_other_rows():
    x, weight, bias = outlier_inputs(seed=2, rows=64)
    packed = int8.pack_linear(weight, bias)
    batch = int8.int8_linear(x.reshape(4, 16, -1), packed)
    assert batch.shape == (4, 16, weight.shape[0])
    for i in (0, 9, 37, 63):
        alone = int8.int8_linear(x[i:i + 1], packed)[0]
        torch.testing.assert_close(batch.reshape(64, -1)[i], alone, rtol=1e-6, atol=1e-6)


def test_cpu_int8_selects_int8_products_at_float32_cpu_inference_only():
    config = LAMConfig(cpu_int8=True)
    cpu = torch.device("cpu")
    assert select_backend(config, cpu, torch.float32, False, False) == Backend("numba", "numba", "chunk", True)
    # Gradients, another dtype, or the option off: float32 products.
    assert select_backend(config, cpu, torch.float32, True, False) == Backend("chunk", "eager", "chunk")
    assert select_backend(config, cpu, torch.float64, False, False) == Backend("chunk", "eager", "chunk")
    config.cpu_int8 = False
    assert select_backend(config, cpu, torch.float32, False, False) == Backend("numba", "numba", "chunk")


def test_cpu_int8_must_be_a_bool():
    with pytest.raises(ValueError, match="LAMConfig.cpu_int8 must be True or False"):
        LAMConfig(cpu_int8="yes")


def test_int8_weights_follow_parameter_changes():
    """The packed int8 weights are kept between calls, and rebuilt when a parameter changes:
    after an in-place change the output equals a fresh model's with the same weights."""
    from conftest import small_lam_sentence_transformer

    st, _ = small_lam_sentence_transformer(delta_net_noise=0.02, cpu_int8=True)
    lam = st[0].auto_model.eval()
    features = st.tokenize(["a first sentence to encode", "and a second, a little longer, one"])
    inputs = {k: features[k] for k in ("input_ids", "attention_mask")}

    def forward(model):
        with torch.no_grad():
            return model(**inputs).last_hidden_state

    before = forward(lam)
    torch.testing.assert_close(forward(lam), before, rtol=0, atol=0)
    with torch.no_grad():
        lam.layers[0].ffn_in.weight.mul_(1.5)
        lam.layers[1].delta_net.o_proj.weight.mul_(0.5)
        lam.layers[1].attention_norm.weight.add_(0.3)
    after = forward(lam)
    assert (after - before).abs().max() > 1e-2
    fresh = type(lam)(lam.config).eval()
    fresh.load_state_dict(lam.state_dict())
    # Float32 rounding apart (1e-7); a stale int8 weight would be off by the change (1e-2).
    torch.testing.assert_close(after, forward(fresh), rtol=0, atol=1e-5)


def test_packed_and_padded_batches_give_the_same_int8_rows():
    """With a scale per token, a valid row's int8 products do not see the padding: the padded
    forward (packed_inference off) equals the packed one on valid rows."""
    from conftest import small_lam_sentence_transformer

    st, _ = small_lam_sentence_transformer(delta_net_noise=0.02, cpu_int8=True)
    lam = st[0].auto_model.eval()
    texts = ["short", "a sentence of middling length for the batch", "word " * 150]
    features = st.tokenize(texts)
    inputs = {k: features[k] for k in ("input_ids", "attention_mask")}
    mask = inputs["attention_mask"].bool()
    outputs = {}
    for packed in (True, False):
        lam.config.packed_inference = packed
        with torch.no_grad():
            outputs[packed] = lam(**inputs).last_hidden_state[mask]
    lam.config.packed_inference = True
    torch.testing.assert_close(outputs[False], outputs[True], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_released_model_in_int8_keeps_float32s_embeddings(tmp_path):
    """The released model with cpu_int8: every text's embedding has a cosine of at least
    0.99 with the float32 one, on mixed lengths from one word to several chunks of 128
    tokens, in one batch and with the texts encoded one at a time."""
    from sentence_transformers import SentenceTransformer

    from lam_embed.release import RELEASED, assemble

    assemble(RELEASED, tmp_path / "lam")
    float32 = SentenceTransformer(str(tmp_path / "lam"), device="cpu")
    quantised = SentenceTransformer(str(tmp_path / "lam"), device="cpu", config_kwargs={"cpu_int8": True})
    assert quantised[0].auto_model.config.cpu_int8
    float32.max_seq_length = quantised.max_seq_length = 512
    sentences = [
        "Tea.", "A man is playing a guitar on the street.", "The committee postponed its vote until spring.",
        "Two dogs run across a snowy field while a child watches from the fence.",
        "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
        "How do I reset the password of my router without losing the network settings?",
    ]
    paragraph = (
        "The river rises in the hills north of the town and runs south through farmland. In the nineteenth "
        "century mills were built along its banks, and the town grew around them. Most closed after the war, "
        "when the railway brought cheaper goods from the coast. Today the old buildings hold a museum, a "
        "library and several small workshops, and a footpath follows the water for twelve miles. "
    )
    texts = sentences + [paragraph, paragraph * 3, " ".join(reversed(sentences)) + " " + paragraph * 5]
    assert quantised.preprocess(texts)["input_ids"].shape[1] > 3 * 128
    reference = float32.encode(texts, normalize_embeddings=True, convert_to_tensor=True)
    batched = quantised.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_tensor=True)
    alone = torch.cat([quantised.encode([t], normalize_embeddings=True, convert_to_tensor=True) for t in texts])
    for got in (batched, alone):
        cosine = (got * reference).sum(1)
        assert cosine.min() >= 0.99, cosine
        assert (got - reference).abs().max() > 1e-4  # the int8 products did run
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
