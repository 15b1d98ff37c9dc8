"""The chunked and compiled dual-state delta rule against the token-level reference."""

import pytest
import torch

from lam_embed import LAMConfig, LAMModel
from lam_embed.layers import ResonanceFlux
from lam_embed.ops import dual_state_delta_rule

LENGTHS = [1, 5, 127, 128, 129, 300, 700]


def lengths_mask(lengths):
    L = max(lengths)
    return torch.arange(L)[None] < torch.tensor(lengths)[:, None]


def op_inputs(lengths, heads=2, d=32, seed=0):
    """Inputs shaped as the layer makes them: unit q/k, sigmoid beta/decays/gates."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = torch.nn.functional.normalize(rand(B, heads, L, d), dim=-1)
    k = torch.nn.functional.normalize(rand(B, heads, L, d), dim=-1)
    v = rand(B, heads, L, d)
    scalars = [torch.sigmoid(rand(B, heads, L) + shift) for shift in (0.0, -0.8, 1.7, 0.0, 0.0)]
    tensors = [q, k, v, *scalars]
    return [t.requires_grad_() for t in tensors], lengths_mask(lengths)


def flux_module(heads=2, d=32, seed=1):
    torch.manual_seed(seed)
    flux = ResonanceFlux(heads, d)
    torch.nn.init.normal_(flux.bilinear, std=0.5)
    torch.nn.init.constant_(flux.temperature, d ** 0.5)
    return flux


def run(impl, tensors, mask, flux):
    out = dual_state_delta_rule(*tensors, mask, flux, chunk_size=128, impl=impl)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    # A loss of order one, over valid positions only, so gradient tolerances are meaningful.
    loss = (out * weights * mask[:, None, :, None]).sum() / mask.sum()
    grads = torch.autograd.grad(loss, tensors + list(flux.parameters()))
    return out.detach() * mask[:, None, :, None], grads


@pytest.fixture(scope="module")
def naive_result():
    tensors, mask = op_inputs(LENGTHS)
    flux = flux_module()
    return tensors, mask, flux, run("naive", tensors, mask, flux)


def test_states_matter_and_reference_is_not_trivial(naive_result):
    tensors, mask, flux, (out, grads) = naive_result
    # Positions in the second chunk must depend on the first chunk (the dual states carry it).
    changed = [t.detach().clone() for t in tensors]
    changed[2][:, :, :64] += 1.0  # values of the first half of chunk one
    out_changed = dual_state_delta_rule(*changed, mask, flux, impl="naive")
    second_chunk = (out_changed - out)[:, :, 128:] * mask[:, None, 128:, None]
    assert second_chunk.abs().max() > 1e-3
    assert all(g.abs().max() > 0 for g in grads)


def test_chunk_matches_naive(naive_result):
    tensors, mask, flux, (out_ref, grads_ref) = naive_result
    out, grads = run("chunk", tensors, mask, flux)
    assert (out - out_ref).abs().max() <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() <= 1e-4


def test_compiled_matches_naive(naive_result):
    tensors, mask, flux, (out_ref, grads_ref) = naive_result
    try:
        out, grads = run("compiled", tensors, mask, flux)
    except Exception as err:  # no C++ compiler or an unsupported platform
        pytest.skip(f"torch.compile does not work on this machine: {type(err).__name__}: {err}")
    assert (out - out_ref).abs().max() <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() <= 1e-4


def test_causal_and_padding_free():
    """A chunk sees only itself and earlier chunks (psi averages over its own chunk, so
    within a chunk the order does matter both ways); padding and other samples never reach it."""
    tensors, mask = op_inputs([300, 300])
    tensors = [t.detach() for t in tensors]
    flux = flux_module()
    out = dual_state_delta_rule(*tensors, mask, flux, impl="chunk")
    later = [t.clone() for t in tensors]
    for t in later:
        t[:, :, 256:] = t[:, :, 256:].flip(2)
    out_later = dual_state_delta_rule(*later, mask, flux, impl="chunk")
    assert (out[:, :, :256] - out_later[:, :, :256]).abs().max() <= 1e-6
    assert (out[:, :, 256:] - out_later[:, :, 256:]).abs().max() > 1e-3
    # The first sample cut to 150 tokens alone equals its first 150 positions when padded in a batch.
    short_mask = mask.clone()
    short_mask[0, 150:] = False
    batched = dual_state_delta_rule(*tensors, short_mask, flux, impl="chunk")[0, :, :150]
    alone = dual_state_delta_rule(*[t[:1, :, :150] for t in tensors], short_mask[:1, :150], flux, impl="chunk")[0]
    assert (batched - alone).abs().max() <= 1e-6


def test_low_precision_inputs_keep_fp32_state_math():
    tensors, mask = op_inputs([200, 90])
    tensors = [t.detach() for t in tensors]
    flux = flux_module()
    ref = dual_state_delta_rule(*tensors, mask, flux, impl="chunk")
    out = dual_state_delta_rule(*[t.bfloat16() for t in tensors], mask, flux, impl="chunk")
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_model_chunk_matches_naive_parameter_gradients():
    torch.manual_seed(0)
    config = LAMConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                       vocab_size=100, hidden_dropout_prob=0.0)
    model = LAMModel(config).eval()
    torch.nn.init.normal_(model.layers[0].delta_net.flux.bilinear, std=0.5)
    mask = lengths_mask(LENGTHS).long()
    ids = torch.randint(1, 100, mask.shape) * mask
    weights = torch.randn(*mask.shape, 64)
    results = {}
    for impl in ("naive", "chunk"):
        model.config.delta_impl = impl
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ((out * weights) * mask[..., None]).sum().div(mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.detach() * mask[..., None], grads)
    (out_ref, grads_ref), (out, grads) = results["naive"], results["chunk"]
    assert (out - out_ref).abs().max() <= 1e-5
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for name in grads:
        assert (grads[name] - grads_ref[name]).abs().max() <= 1e-4, name


def test_unknown_impl_is_rejected():
    tensors, mask = op_inputs([3])
    for name in ("fast", "auto"):  # "auto" is the model's choice (lam_embed/backends.py), not the op's
        with pytest.raises(ValueError, match="impl must be one of"):
            dual_state_delta_rule(*tensors, mask, flux_module(), impl=name)
    with pytest.raises(ValueError, match="CUDA"):
        dual_state_delta_rule(*tensors, mask, flux_module(), impl="triton")


def test_qk_l2norm_normalises_inside():
    """qk_l2norm=True on raw q, k (any scale, low precision) is the op on unit q, k in float32."""
    tensors, mask = op_inputs([200, 90])
    tensors = [t.detach() for t in tensors]
    flux = flux_module()
    ref = dual_state_delta_rule(*tensors, mask, flux, impl="chunk")
    scales = torch.rand(2, 2, 200, 1, generator=torch.Generator().manual_seed(3)) * 4 + 0.25
    raw = [tensors[0] * scales, tensors[1] * scales.flip(2), *tensors[2:]]
    out = dual_state_delta_rule(*raw, mask, flux, impl="chunk", qk_l2norm=True)
    assert out.dtype == torch.float32
    assert ((out - ref) * mask[:, None, :, None]).abs().max() <= 1e-5
    out = dual_state_delta_rule(*[t.bfloat16() for t in raw], mask, flux, impl="chunk", qk_l2norm=True)
    assert out.dtype == torch.float32  # the normalised q is float32, whatever came in
    assert ((out - ref) * mask[:, None, :, None]).abs().max() <= 2e-2 * ref.abs().max()
