"""The DualStateDeltaNet layer's code around the delta rule: fused projections, the
shifted-sum convolution and the compiled form of both, against a plain reference."""

import os

import pytest
import torch
import torch.nn.functional as F

from lam_embed import LAMConfig
from lam_embed.layers.dual_state_delta_net import (
    DualStateDeltaNet,
    _compiled_layer_functions,
    causal_depthwise_conv,
    delta_net_features,
    delta_net_output,
)
from lam_embed.backends import select_backend
from lam_embed.ops import dual_state_delta_rule

# Three chunks in the longest row: the state after the second chunk is read by the
# third, so the decays have real gradients (with two chunks they would have none).
LENGTHS = [300, 40, 3, 1]


def layer_code(net, x, wants_grad=False):
    """How the layer code of ``net`` runs for x (lam_embed/backends.py)."""
    return select_backend(net.config, x.device, x.dtype, wants_grad, net.training).layer_code


def make_layer(seed=0, hidden_size=64, num_heads=2):
    torch.manual_seed(seed)
    config = LAMConfig(hidden_size=hidden_size, num_attention_heads=num_heads, delta_impl="chunk")
    net = DualStateDeltaNet(config)
    with torch.no_grad():  # every parameter non-trivial, as after training
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        net.flux.temperature.fill_(config.head_dim ** 0.5)
    return net


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), max(LENGTHS), 64, generator=g)
    mask = torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]
    return x, mask


def reference_forward(net, x, mask):
    """The layer as docs/SPEC.md writes it: separate projections, nn.Conv1d on (B, D, L)."""
    config = net.config
    B, L, D = x.shape
    H = config.num_attention_heads

    def conv(module, t):
        return F.conv1d(t.transpose(1, 2), module.weight, padding=module.kernel_size[0] - 1, groups=D)[..., :L].transpose(1, 2)

    keep = mask[..., None].to(x.dtype)
    q = F.silu(conv(net.q_conv, net.q_proj(x) * keep))
    k = F.silu(conv(net.k_conv, net.k_proj(x) * keep))
    v = F.silu(conv(net.v_conv, net.v_proj(x) * keep))
    heads = lambda t: t.view(B, L, H, -1).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
    per_head = lambda t: torch.sigmoid(t).transpose(1, 2)  # noqa: E731
    o = dual_state_delta_rule(
        q, k, v, per_head(net.beta_proj(x)), per_head(net.fast_decay_proj(x)), per_head(net.slow_decay_proj(x)),
        per_head(net.fast_gate_proj(x)), per_head(net.slow_gate_proj(x)), mask, net.flux, impl="chunk",
    )
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * net.norm_weight
    o = o.transpose(1, 2).reshape(B, L, D) * torch.sigmoid(net.g_proj(x))
    return net.o_proj(o)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 9])
def test_causal_depthwise_conv_matches_conv1d(length):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 6, generator=g, requires_grad=True)
    weight = torch.randn(6, 1, 4, generator=g, requires_grad=True)
    ref = F.conv1d(x.transpose(1, 2), weight, padding=3, groups=6)[..., :length].transpose(1, 2)
    out = causal_depthwise_conv(x, weight)
    assert (out - ref).abs().max() <= 1e-6
    seed = torch.randn(ref.shape, generator=g)
    grads_ref = torch.autograd.grad((ref * seed).sum(), (x, weight))
    grads = torch.autograd.grad((out * seed).sum(), (x, weight))
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() <= 1e-5


def test_fused_layer_matches_reference():
    """Outputs on valid tokens and every parameter gradient equal those of the plain form."""
    net = make_layer()
    x, mask = make_inputs()
    weights = torch.randn(*x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (reference_forward, lambda n, a, m: n(a, m)):
        net.zero_grad()
        out = forward(net, x, mask)
        (out * weights * mask[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out.detach() * mask[..., None], grads))
    (ref, grads_ref), (out, grads) = results
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert grads.keys() == grads_ref.keys() == {n for n, _ in net.named_parameters()}
    for name in grads:
        # Relative differences reach 4e-5 here (float32 sums in another order); a wrong
        # gradient is off by its own size.
        scale = grads_ref[name].abs().max()
        assert scale > 0, name
        assert (grads[name] - grads_ref[name]).abs().max() <= 3e-4 * scale, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stacked_weights_follow_every_parameter_change(device):
    """The stacked weights are kept between inference calls; they must never
    outlive a change of a parameter: a fused AdamW step (which does not move version
    counters), an in-place update, a replaced parameter, a conversion."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net = make_layer().to(device).eval()
    x, mask = (t.to(device) for t in make_inputs())
    D = net.config.hidden_size

    def check():
        with torch.no_grad():
            weight, bias, conv = net.stacked_weights()
        assert torch.equal(weight[:D], net.q_proj.weight) and torch.equal(weight[D:2 * D], net.k_proj.weight)
        assert torch.equal(conv[2 * D:], net.v_conv.weight)
        H = net.config.num_attention_heads
        assert torch.equal(bias[4 * D + 2 * H:4 * D + 3 * H], net.slow_decay_proj.bias)

    check()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        before = net(x, mask)
    net(x, mask).sum().backward()
    optimizer.step()
    check()
    with torch.no_grad():
        assert (net(x, mask) - before).abs().max() > 1e-3
        net.k_proj.weight.mul_(2.0)
        check()
        net.slow_decay_proj.bias.add_(1.0)
        check()
        net.v_conv.weight = torch.nn.Parameter(torch.ones_like(net.v_conv.weight))
        check()
        net.double()
        assert all(t.dtype == torch.float64 for t in net.stacked_weights())
        check()


def test_cpu_forward_does_not_compile():
    """The compiled form of the layer code is for CUDA only; on CPU it is never built."""
    _compiled_layer_functions.cache_clear()
    net = make_layer()
    net.config.delta_impl = "compiled"
    x, mask = make_inputs()
    with torch.no_grad():
        net(x, mask)
    assert _compiled_layer_functions.cache_info().currsize == 0


@pytest.mark.slow
def test_compiled_layer_functions_match_eager():
    """What the GPU path runs (the two functions under torch.compile, dynamic shapes)
    equals the eager functions; checked here on CPU, two lengths through one graph."""
    net = make_layer()
    features, output = _compiled_layer_functions()
    H = net.config.num_attention_heads
    weight, bias = net.input_projection()
    conv_weight = torch.cat([net.q_conv.weight, net.k_conv.weight, net.v_conv.weight])
    try:
        for length in (130, 37):
            x, mask = make_inputs()
            x, mask = x[:, :length], mask[:, :length]
            with torch.no_grad():
                ref = delta_net_features(x, mask, weight, bias, conv_weight, H)
                out = features(x, mask, weight, bias, conv_weight, H)
                for a, b in zip(out, ref):
                    assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
                o = torch.randn(*x.shape[:2], H, 32)
                args = (out[3], net.norm_weight, net.o_proj.weight, 1e-6)
                ref_out = delta_net_output(o, *args)
                assert (output(o, *args) - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    except Exception as err:  # noqa: BLE001 - no C++ compiler or an unsupported platform
        if isinstance(err, AssertionError):
            raise
        pytest.skip(f"torch.compile does not work on this machine: {type(err).__name__}: {err}")
    finally:
        _compiled_layer_functions.cache_clear()


# --------------------------------------------------------------- Triton kernels of the layer code (ops/triton/layer.py)

_LAYER_KERNELS_CHECK = """
import torch
import torch.nn.functional as F
from lam_embed.ops.triton.layer import delta_net_from_projection, delta_rule_from_projection, residual_layer_norm
from lam_embed.layers import delta_net_features, delta_net_output
from lam_embed.modeling_lam import LAMEmbeddings
from lam_embed.ops import dual_state_delta_rule
from test_layer import make_layer, make_inputs
from test_triton import patch_interpreter
patch_interpreter()

net = make_layer()
x, mask = make_inputs()
mask[1, 5:9] = False  # a hole: the convolution must read it as zeros, as delta_net_features does
x = x.to({device!r}, {dtype})
mask = mask.to({device!r})
net.to({device!r}, {dtype})
H, D = net.config.num_attention_heads, x.shape[-1]
# float32: rounding only; bfloat16: the reference rounds after every tap of the convolution, the kernels once.
close = lambda a, b: (a - b).float().abs().max() <= {bound} * b.float().abs().max()
for length in (300, 100):  # three chunks, then a single chunk: the two paths of the kernels
    xl, ml = x[:, :length].contiguous(), mask[:, :length].contiguous()
    with torch.no_grad():
        weight, bias, conv_weight = net.stacked_weights()
        q, k, v, gate, *scalars = delta_net_features(xl, ml, weight, bias, conv_weight, H)
        heads = [t.transpose(1, 2) for t in (q, k, v, *scalars)]
        ref = dual_state_delta_rule(*heads, ml, net.flux, impl="chunk", qk_l2norm=True)
        projected = F.linear(xl, weight, bias)  # padding not zeroed: the kernels must ignore it
        out = delta_rule_from_projection(projected, ml, conv_weight, net.flux, H, 128)
        assert out.shape == ref.shape and out.dtype == torch.float32
        valid = ml[:, None, :, None]
        assert close(out * valid, ref * valid), (length, ((out - ref) * valid).abs().max())
        # The whole token mixer: the kernels apply the RMSNorm and the gate's sigmoid as
        # they write O, then the output projection.
        ref_out = delta_net_output(ref.transpose(1, 2), gate, net.norm_weight, net.o_proj.weight, 1e-6)
        whole = delta_net_from_projection(projected, ml, conv_weight, net.flux, net.norm_weight, net.o_proj.weight,
                                          1e-6, H, 128)
        assert whole.shape == ref_out.shape and whole.dtype == ref_out.dtype
        assert close(whole[ml], ref_out[ml]), (length, (whole - ref_out)[ml].abs().max())

# The residual LayerNorm.
g = torch.Generator().manual_seed(3)
norm = torch.nn.LayerNorm(x.shape[-1], eps=1e-12).to({device!r}, {dtype})
with torch.no_grad():
    norm.weight.normal_()
    norm.bias.normal_()
    y = torch.randn(x.shape, generator=g).to({device!r}, {dtype})
    ref = norm(x + y)
    out = residual_layer_norm(x, y, norm.weight, norm.bias, norm.eps)
assert out.shape == ref.shape and out.dtype == ref.dtype
# bfloat16: the reference rounds x + y before normalising, the kernel does not.
assert close(out, ref), (out - ref).abs().max()

# The embeddings (LAMEmbeddings.fused): positions past the table read cyclically, ids
# and types outside their tables clamped as LAMModel._encode clamps them.
emb = LAMEmbeddings(net.config.__class__(hidden_size=x.shape[-1], num_attention_heads=H, vocab_size=300,
                                         position_table_size=50, type_vocab_size=2)).eval()
ids = torch.randint(0, 300, (3, 130), generator=g)
types = torch.randint(0, 2, (3, 130), generator=g)
ids[0, 5], ids[1, 7], types[2, 9] = -4, 300, 5
with torch.no_grad():
    emb.LayerNorm.weight.normal_(generator=g)
    emb.LayerNorm.bias.normal_(generator=g)
    emb.to({device!r}, {dtype})
    ids, types = ids.to({device!r}), types.to({device!r})
    ref = emb(ids.clamp(0, 299), types.clamp(0, 1))
    out = emb.fused(ids, types)
assert out.shape == ref.shape and out.dtype == ref.dtype
# bfloat16: the reference rounds the sum of the three rows before normalising, the kernel does not.
assert close(out, ref), (out - ref).abs().max()
"""


def _run_layer_kernels_check(env_extra, **fmt):
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), **env_extra)
    done = subprocess.run([sys.executable, "-c", _LAYER_KERNELS_CHECK.format(**fmt)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_layer_kernels_under_the_interpreter():
    """ops/triton/layer.py equals the eager layer code: the delta rule from the input projection
    (delta_net_features, then the chunk op), delta_net_output, the residual LayerNorm and
    the embeddings;
    on CPU, through TRITON_INTERPRET=1 (in a subprocess: the variable is read
    when the kernels are defined)."""
    pytest.importorskip("triton")
    _run_layer_kernels_check({"TRITON_INTERPRET": "1"}, device="cpu", dtype="torch.float32", bound=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [("torch.float32", 1e-5), ("torch.bfloat16", 2e-2)])
def test_layer_kernels_match_eager_on_gpu(dtype, bound):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _run_layer_kernels_check({}, device="cuda", dtype=dtype, bound=bound)


@pytest.mark.gpu
def test_fused_layer_code_follows_delta_impl():
    """The fused inference path is delta_impl "triton" only: "compiled" keeps torch.compile's
    code (it is what that choice measures), and gradients always take the compiled path."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net = make_layer().cuda()
    x = torch.randn(1, 4, 64, device="cuda")
    for impl, want in (("triton", "triton"), ("auto", "triton"), ("compiled", "compiled"), ("chunk", "eager")):
        net.config.delta_impl = impl
        assert layer_code(net, x) == want, impl
    net.config.delta_impl = "triton"
    assert layer_code(net, x, wants_grad=True) == "compiled"
    net.config.state_dropout = 0.1
    assert layer_code(net.train(), x) == "compiled"  # state dropout while training
    assert layer_code(net.eval(), x) == "triton"
    with pytest.raises(ValueError, match="CUDA"):
        layer_code(net, x.cpu())
    net.config.delta_impl = "numba"
    with pytest.raises(ValueError, match="CPU"):
        layer_code(net, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_feed_forward_on_gpu_matches_float32_erf_gelu(dtype, monkeypatch):
    """The FFN at 16-bit CUDA inference is one cuBLASLt product with a GELU epilogue (tanh
    form, see LAMConfig.gelu_epilogue): within bfloat16 rounding of the float32 product
    with erf GELU. float32 inputs keep the erf GELU and agree to float32 rounding."""
    from lam_embed import modeling_lam

    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    config = LAMConfig(hidden_size=128, num_attention_heads=4, intermediate_size=512, delta_impl="triton")
    layer = modeling_lam.LAMLayer(config).cuda().eval()
    h = torch.randn(3, 70, 128, device="cuda")
    with torch.no_grad():
        ref = layer.ffn_out(F.gelu(layer.ffn_in(h)))  # float32, erf GELU
        layer.to(dtype)
        calls = []
        real = torch._addmm_activation
        monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = layer.feed_forward(h.to(dtype), select_backend(config, h.device, dtype, False, False))
    assert bool(calls) == (dtype != torch.float32)  # the epilogue path is taken for 16-bit inputs only
    assert out.shape == ref.shape and out.dtype == dtype
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - ref).abs().max() <= bound * ref.abs().max(), (out.float() - ref).abs().max()


def test_numba_layer_matches_reference():
    """CPU inference runs the numba kernel (ops/numba.py); its outputs on valid tokens
    equal the plain form's: one chunk and several, padding inside a chunk and at the end,
    a chunk without valid tokens in the middle (the states pass it unchanged) and at the
    start (they stay zero). With one thread too: the kernel's (sample, head) tasks then share
    fewer scratch buffers, one after another, long and short ones. And one sample alone: its
    few (sample, head) tasks, fewer than the threads' blocks, are each run once."""
    pytest.importorskip("numba")
    threads = torch.get_num_threads()
    for hidden, heads in ((64, 2), (48, 3)):  # head sizes 32 and 16
        net = make_layer(hidden_size=hidden, num_heads=heads)
        net.config.delta_impl = "auto"
        C = net.config.chunk_size
        g = torch.Generator().manual_seed(3)
        lengths = [3 * C - 40, 3 * C - 40, C + 1, C, 40, 1, 2 * C + 5, 2 * C + 5]
        x = torch.randn(len(lengths), max(lengths), hidden, generator=g)
        mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
        mask[0, 5:9] = False  # a hole: its tokens are not read, the ones after it are
        mask[1, C : 2 * C] = False  # the second chunk empty
        mask[2, :C] = False  # the first chunk empty
        with torch.no_grad():
            assert layer_code(net, x) == "numba"
            for rows in (slice(None), slice(6, 7)):
                ref = reference_forward(net, x[rows], mask[rows]) * mask[rows, :, None]
                for thread_count in (threads, 1):
                    torch.set_num_threads(thread_count)
                    try:
                        out = net(x[rows], mask[rows]) * mask[rows, :, None]
                    finally:
                        torch.set_num_threads(threads)
                    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (hidden, heads, rows, thread_count)


def test_numba_layer_only_where_it_applies():
    """The numba kernel runs for CPU float32 inference with delta_impl "auto"; anything
    else (gradients, autocast, another delta_impl or dtype) keeps the eager code, which
    the outputs show: the same either way."""
    pytest.importorskip("numba")
    net = make_layer()
    net.config.delta_impl = "auto"
    x, mask = make_inputs()
    short = x[:, :40]
    assert layer_code(net, short) == "numba"
    assert layer_code(net, x) == "numba"  # 300 tokens: three chunks
    assert layer_code(net, short.double()) == "eager"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer_code(net, short) == "eager"
    for impl in ("chunk", "naive", "compiled"):
        net.config.delta_impl = impl
        assert layer_code(net, short) == "eager", impl
    net.config.delta_impl = "auto"
    assert layer_code(net, short, wants_grad=True) == "eager"
    with torch.no_grad():
        fused = net(short, mask[:, :40])
    net.config.delta_impl = "chunk"
    with torch.no_grad():
        eager = net(short, mask[:, :40])
    valid = mask[:, :40, None]
    assert ((fused - eager) * valid).abs().max() <= 1e-5 * (eager * valid).abs().max()


def test_numba_layer_keeps_torch_thread_count():
    """Starting numba's OpenMP pool sets the OpenMP thread count that torch reads too; the
    layer puts torch's back, so a process's numerics do not change after its first CPU
    encode. Run in a fresh process: the pool starts only once per process."""
    pytest.importorskip("numba")
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from tests.test_layer import make_layer\n"
        "net = make_layer()\n"
        "net.config.delta_impl = 'auto'\n"
        "with torch.no_grad():\n"
        "    net(torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool))\n"
        "import numba\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "NUMBA_NUM_THREADS": "2"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.stdout.split() == ["1", "1"]
