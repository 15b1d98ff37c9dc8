"""The fused Triton dual-state delta rule (lam_embed/ops/triton/) against the chunked one.

GPU tests: skipped without triton or CUDA. One CPU test runs the kernels under
Triton's interpreter (slow; skipped without triton).

Run as a script on a GPU machine for timings:
    python tests/test_triton.py --bench           # triton vs chunk vs compiled, 32,768 tokens a call
    python tests/test_triton.py --bench --sweep   # and the launch-setting variants of the kernels
    python tests/test_triton.py --bench --compiled  # and delta_impl="compiled" (slow to compile)
and without a GPU (needs triton):
    python tests/test_triton.py --resources       # registers and spills of each kernel and variant (ptxas)
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lam_embed.layers import ResonanceFlux

LENGTHS = [1, 100, 128, 129, 1000, 8192]
HEADS, HEAD_DIM = 12, 32


def make_inputs(lengths, heads=HEADS, d=HEAD_DIM, seed=0, device="cpu"):
    """Inputs as the layer makes them: SiLU features with unit q/k per head, sigmoid
    beta/decays/gates, all (B, H, L, .) views of (B, L, H, .) tensors; mask right-padded."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = F.normalize(F.silu(rand(B, L, heads, d)), dim=-1)
    k = F.normalize(F.silu(rand(B, L, heads, d) + 0.5), dim=-1)  # correlated keys, as SiLU makes them
    v = F.silu(rand(B, L, heads, d))
    scalars = [torch.sigmoid(rand(B, L, heads) + shift) for shift in (0.0, -0.8, 1.7, 0.0, 0.0)]
    tensors = [t.to(device).transpose(1, 2) for t in (q, k, v, *scalars)]
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).to(device)
    return tensors, mask


def make_flux(heads=HEADS, d=HEAD_DIM, seed=1, device="cpu"):
    torch.manual_seed(seed)
    flux = ResonanceFlux(heads, d)
    torch.nn.init.normal_(flux.bilinear, std=0.5)
    torch.nn.init.constant_(flux.temperature, d ** 0.5)
    return flux.to(device)


def batch_lengths(L):
    """Mixed lengths with the longest L: full, partial last chunk, whole padded chunks."""
    return sorted({L, max(1, L - 37), max(1, L // 3), max(1, min(L, 5))}, reverse=True)


def max_error(out, ref, mask):
    """Largest |out - ref| over valid positions, and over all positions."""
    diff = (out.float() - ref.float()).abs()
    return (diff * mask[:, None, :, None]).max().item(), diff.max().item()


# ---------------------------------------------------------------------------- GPU tests


def _needs_gpu():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture(scope="module")
def gpu():
    """The CUDA device."""
    _needs_gpu()
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("L", LENGTHS)
def test_forward_fp32_matches_chunk(gpu, L):
    from lam_embed.ops import dual_state_delta_rule

    tensors, mask = make_inputs(batch_lengths(L), device=gpu)
    flux = make_flux(device=gpu)
    with torch.no_grad():
        ref = dual_state_delta_rule(*tensors, mask, flux, impl="chunk")
        out = dual_state_delta_rule(*tensors, mask, flux, impl="triton")
    valid, everywhere = max_error(out, ref, mask)
    print(f"\nfp32 L={L}: max error {valid:.2e} (valid) {everywhere:.2e} (all), output scale {ref.abs().max().item():.2f}")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert valid <= 1e-4
    assert everywhere <= 1e-4  # padded positions are computed as chunk computes them


@pytest.mark.gpu
@pytest.mark.parametrize("L", LENGTHS)
def test_forward_bf16_matches_chunk(gpu, L):
    from lam_embed.ops import chunk_dual_state_delta_rule
    from lam_embed.ops.triton import triton_dual_state_delta_rule

    tensors, mask = make_inputs(batch_lengths(L), device=gpu)
    tensors = [t.bfloat16() for t in tensors]
    flux = make_flux(device=gpu)
    chunk_size = min(128, L)
    with torch.no_grad():
        ref = chunk_dual_state_delta_rule(*[t.float() for t in tensors], mask, flux, chunk_size=chunk_size)
        out = triton_dual_state_delta_rule(*tensors, mask, flux, chunk_size=chunk_size)
    valid, _ = max_error(out, ref, mask)
    scale = ref.abs().max().item()
    print(f"\nbf16 L={L}: max error {valid:.2e}, output scale {scale:.2f}")
    assert out.dtype == torch.bfloat16
    assert valid <= 2e-2 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("L", [100, 129, 1000])
def test_gradients_match_chunk(gpu, L):
    from lam_embed.ops import dual_state_delta_rule

    tensors, mask = make_inputs(batch_lengths(L), heads=4, device=gpu)
    flux = make_flux(heads=4, device=gpu)
    weights = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(7)).to(gpu)
    results = {}
    for impl in ("chunk", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = dual_state_delta_rule(*leaves, mask, flux, impl=impl)
        loss = (out * weights * mask[:, None, :, None]).sum() / mask.sum()
        # allow_unused: a single-chunk input does not read the decays.
        results[impl] = torch.autograd.grad(loss, leaves + list(flux.parameters()), allow_unused=True)
    assert [g is None for g in results["triton"]] == [g is None for g in results["chunk"]]
    worst = max((g - g_ref).abs().max().item() for g, g_ref in zip(results["triton"], results["chunk"]) if g is not None)
    print(f"\ngradients L={L}: max error {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.gpu
def test_model_triton_matches_chunk(gpu):
    """The whole layer through delta_impl="triton": outputs and every parameter gradient."""
    from lam_embed import LAMConfig, LAMModel

    torch.manual_seed(0)
    config = LAMConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                       vocab_size=100, hidden_dropout_prob=0.0)
    model = LAMModel(config).to(gpu).eval()
    lengths = [300, 129, 40]
    mask = (torch.arange(300)[None] < torch.tensor(lengths)[:, None]).long().to(gpu)
    ids = torch.randint(1, 100, mask.shape, device=gpu) * mask
    weights = torch.randn(*mask.shape, 64, device=gpu)
    results = {}
    for impl in ("chunk", "triton"):
        model.config.delta_impl = impl
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (out * weights * mask[..., None]).sum().div(mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.detach() * mask[..., None], grads)
    (out_ref, grads_ref), (out, grads) = results["chunk"], results["triton"]
    assert (out - out_ref).abs().max() <= 1e-4
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert (grads[name] - grads_ref[name]).abs().max() <= 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_model_inference_matches_chunk(gpu, dtype, bound):
    """At inference (no gradients) delta_impl="triton" also runs the layer code as the
    Triton kernels of ops/triton/layer.py; the output still equals the eager "chunk" model
    (bfloat16: within 2e-2 of the output scale)."""
    from lam_embed import LAMConfig, LAMModel

    torch.manual_seed(0)
    config = LAMConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                       vocab_size=100)
    model = LAMModel(config).to(gpu, dtype).eval()
    lengths = [300, 129, 40, 1]
    mask = (torch.arange(300)[None] < torch.tensor(lengths)[:, None]).long().to(gpu)
    ids = torch.randint(1, 100, mask.shape, device=gpu) * mask
    outs = {}
    with torch.no_grad():
        for impl in ("chunk", "triton"):
            model.config.delta_impl = impl
            outs[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state.float() * mask[..., None]
    assert (outs["triton"] - outs["chunk"]).abs().max() <= bound * outs["chunk"].abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("position_overflow", ["wrap", "clamp"])
def test_fused_embeddings_read_positions_past_the_table_as_eager(gpu, position_overflow):
    """The fused embedding kernel reads positions past a (small) table as LAMConfig.position_overflow says."""
    from lam_embed import LAMConfig, LAMModel

    torch.manual_seed(0)
    config = LAMConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                       vocab_size=100, position_table_size=40, position_overflow=position_overflow)
    emb = LAMModel(config).to(gpu).eval().embeddings
    ids = torch.randint(1, 100, (2, 300), device=gpu)
    with torch.no_grad():
        torch.testing.assert_close(emb.fused(ids, torch.zeros_like(ids)), emb(ids, torch.zeros_like(ids)),
                                   rtol=1e-5, atol=1e-5)


def raw_qk(tensors, dtype=torch.bfloat16, seed=5):
    """The inputs with q and k scaled per row by factors in [0.5, 4) (what the layer
    gives with qk_l2norm), q, k, v in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, *rest = tensors
    scale = lambda t: t * (0.5 + 3.5 * torch.rand(t.shape[:-1] + (1,), generator=g)).to(t.device)  # noqa: E731
    return [scale(q).to(dtype), scale(k).to(dtype), v.to(dtype), *rest]


@pytest.mark.gpu
@pytest.mark.parametrize("L", [100, 129, 1000])
def test_qk_l2norm_matches_chunk(gpu, L):
    """qk_l2norm: the kernels normalise q and k on load; the chunk form on the normalised
    float32 q, k must agree, forward (float32 output) and gradients (to the raw q, k)."""
    from lam_embed.ops import dual_state_delta_rule
    from lam_embed.ops.common import l2norm

    tensors, mask = make_inputs(batch_lengths(L), heads=4, device=gpu)
    tensors = raw_qk(tensors)
    flux = make_flux(heads=4, device=gpu)
    weights = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(7)).to(gpu)
    results = {}
    for impl in ("chunk", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = dual_state_delta_rule(*leaves, mask, flux, impl=impl, qk_l2norm=True)
        assert out.dtype == torch.float32
        loss = (out * weights * mask[:, None, :, None]).sum() / mask.sum()
        grads = torch.autograd.grad(loss, leaves + list(flux.parameters()), allow_unused=True)
        results[impl] = (out.detach(), grads)
    (ref, grads_ref), (out, grads) = results["chunk"], results["triton"]
    with torch.no_grad():  # the chunk form given normalised inputs: the same op
        unit = [l2norm(tensors[0]), l2norm(tensors[1]), *[t.float() for t in tensors[2:]]]
        assert max_error(dual_state_delta_rule(*unit, mask, flux, impl="chunk"), ref, mask)[0] <= 1e-6
    valid, _ = max_error(out, ref, mask)
    worst = max((g - g_ref).abs().max().item() for g, g_ref in zip(grads, grads_ref) if g is not None)
    scale = ref.abs().max().item()
    print(f"\nqk_l2norm L={L}: max error {valid:.2e} (output scale {scale:.2f}), gradients {worst:.2e}")
    # bf16 inputs run the kernels' products on bfloat16 and tf32 operands and hand the
    # blocks' results on in bfloat16 (LaunchSettings): errors near 7e-3 of the output scale on
    # an H200, inside the bf16 bound of 2e-2.
    assert valid <= 2e-2 * scale and worst <= 1e-4


@pytest.mark.gpu
def test_state_dropout_while_training_falls_back_to_chunk(gpu):
    from lam_embed.ops.triton import triton_dual_state_delta_rule

    tensors, mask = make_inputs([300, 200], heads=2, device=gpu)
    flux = make_flux(heads=2, device=gpu)
    torch.manual_seed(3)
    out = triton_dual_state_delta_rule(*tensors, mask, flux, state_dropout=0.5, training=True)
    from lam_embed.ops import chunk_dual_state_delta_rule

    torch.manual_seed(3)
    ref = chunk_dual_state_delta_rule(*tensors, mask, flux, state_dropout=0.5, training=True)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------- CPU: the interpreter

def patch_interpreter():
    """triton 3.6's interpreter turns a run-time loop bound into int() of a 1-element
    array, which numpy >= 2.3 refuses: index it instead."""
    import numpy as np
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor = _patch_lang_tensor


_INTERPRETER_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_triton import make_inputs, make_flux, max_error, patch_interpreter, raw_qk
    patch_interpreter()
    from lam_embed.ops import chunk_dual_state_delta_rule
    from lam_embed.ops.common import l2norm
    from dataclasses import replace
    from lam_embed.ops.triton import DEFAULT_LAUNCH, triton_dual_state_delta_rule

    # The logic in float32: products at full precision and float32 results between the
    # kernels for the bfloat16 inputs too (the interpreter has no bfloat16 products; what
    # the GPU's bfloat16 settings cost in accuracy, the GPU tests bound).
    exact = replace(DEFAULT_LAUNCH, prepare_precision=dict.fromkeys(DEFAULT_LAUNCH.prepare_precision, "ieee"),
                    stage_dtype=dict.fromkeys(DEFAULT_LAUNCH.stage_dtype, torch.float32))
    flux = make_flux(heads=2)
    # The second case with the blocks' d x d products made one head at a time (as for a
    # large input), the third with blocks of two 16-row parts (LaunchSettings.sub_blocks).
    cases = (([100, 37], 100, 1 << 26, 1), ([300, 129, 10], 128, 1, 1), ([300, 129, 10], 128, 1 << 26, 2))
    for lengths, chunk_size, stage_bytes, sub_blocks in cases:
        launch = replace(exact, stage_bytes=stage_bytes, sub_blocks=sub_blocks)
        tensors, mask = make_inputs(lengths, heads=2)
        with torch.no_grad():
            ref = chunk_dual_state_delta_rule(*tensors, mask, flux, chunk_size=chunk_size)
            out = triton_dual_state_delta_rule(*tensors, mask, flux, chunk_size=chunk_size, launch=launch)
            # qk_l2norm: raw bfloat16 q, k, v, normalised on load by the kernel.
            raw = raw_qk(tensors)
            unit = [l2norm(raw[0]), l2norm(raw[1]), *[t.float() for t in raw[2:]]]
            ref_norm = chunk_dual_state_delta_rule(*unit, mask, flux, chunk_size=chunk_size)
            out_norm = triton_dual_state_delta_rule(*raw, mask, flux, chunk_size=chunk_size, qk_l2norm=True,
                                                    launch=launch)
        for a, b in ((out, ref), (out_norm, ref_norm)):
            _, err = max_error(a, b, mask)
            print(lengths, err)
            assert a.dtype == torch.float32 and err <= 1e-5, (lengths, err)

    # Carried states: the states after each sample's own chunk (0: none), then inputs of
    # several chunks and of one chunk continued from them.
    tensors, mask = make_inputs([300, 200, 50], heads=2)
    after = torch.tensor([2, 1, 0])
    with torch.no_grad():
        ref, ref_states = chunk_dual_state_delta_rule(*tensors, mask, flux, chunk_size=128, state_after_chunks=after)
        out, states = triton_dual_state_delta_rule(*tensors, mask, flux, chunk_size=128, launch=exact,
                                                   state_after_chunks=after)
        assert max_error(out, ref, mask)[1] <= 1e-5
        assert max((a - b).abs().max() for a, b in zip(states, ref_states)) <= 1e-6
        for lengths in ([300, 200, 50], [50, 20, 1]):
            tensors, mask = make_inputs(lengths, heads=2, seed=3)
            ref = chunk_dual_state_delta_rule(*tensors, mask, flux, chunk_size=128, initial_state=ref_states)
            out = triton_dual_state_delta_rule(*tensors, mask, flux, chunk_size=128, launch=exact,
                                               initial_state=ref_states)
            _, err = max_error(out, ref, mask)
            print("carried", lengths, err)
            assert err <= 1e-5, ("carried", lengths, err)
""")


@pytest.mark.slow
def test_kernels_under_the_interpreter():
    """The kernels' logic on CPU, through TRITON_INTERPRET=1 (in a subprocess: the
    variable is read when the kernels are defined)."""
    pytest.importorskip("triton")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


def compile_only():
    """Make every Triton launch a compilation for sm_90 (H100/H200) instead, on a machine
    without a GPU: ``JITFunction.warmup`` through a driver that reports that target. Returns
    the list that collects (kernel name, compiled kernel) for each launch. Changes triton
    for the whole process (run it in a subprocess or a script)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:  # what JITFunction.warmup asks of a driver
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(CompileOnlyDriver())
    compiled = []
    JITFunction.__getitem__ = lambda self, grid: (
        lambda *a, **k: compiled.append((self.__name__, self.warmup(*a, grid=grid, **k))))
    return compiled


def launch_layer_kernels(dtype, B, L, flux, launch=None):
    """The layer's inference path on CPU tensors of B x L tokens (under compile_only: its
    kernels compiled for that specialisation): the token mixer from the input projection
    (as the model runs it), the op from q, k, v, a residual LayerNorm and the embeddings."""
    from lam_embed.ops import triton as T
    from lam_embed.ops.triton import layer as LT

    launch = launch or T.DEFAULT_LAUNCH
    D = HEADS * HEAD_DIM
    tensors, mask = make_inputs([L] * B)
    projected = torch.randn(B, L, 4 * D + 5 * HEADS + 4).to(dtype)
    LT.delta_net_from_projection(projected, mask, torch.randn(3 * D, 1, 4).to(dtype), flux,
                                 torch.ones(HEAD_DIM, dtype=dtype), torch.randn(D, D).to(dtype), 1e-6, HEADS, 128,
                                 launch=launch)
    T.triton_forward(*[t.to(dtype) for t in tensors], mask, T.delta_rule.flux_parameters(flux), 128, launch=launch)
    x = torch.randn(B, 7, D).to(dtype)
    LT.residual_layer_norm(x, x, torch.ones(D, dtype=dtype), torch.zeros(D, dtype=dtype), 1e-12)
    ids = torch.ones(B, 7, dtype=torch.long)
    LT.embedding_layer_norm(ids, ids, torch.randn(50, D).to(dtype), torch.randn(20, D).to(dtype),
                            torch.randn(2, D).to(dtype), torch.ones(D, dtype=dtype), torch.zeros(D, dtype=dtype), 1e-12)


_COMPILE_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_triton import compile_only, launch_layer_kernels, make_flux

    compiled = compile_only()
    flux = make_flux()
    for dtype in (torch.float32, torch.bfloat16):
        for L in (100, 300):  # one chunk, three
            launch_layer_kernels(dtype, 2, L, flux)
    names = {{name for name, kernel in compiled if kernel.asm.get("cubin")}}
    assert names == {{"block_prepare_kernel", "chunk_scan_kernel", "state_recurrence_kernel", "chunk_output_kernel",
                     "residual_layer_norm_kernel", "embedding_layer_norm_kernel"}}, names
    print(len(compiled), "compilations")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel, in each specialisation the layer's inference path launches, compiles to
    a cubin for sm_90 (H100/H200) on a machine without a GPU: the wrappers run on CPU
    tensors, with each launch turned into a compilation. This catches what the
    interpreter cannot (types, layouts, register allocation in ptxas)."""
    pytest.importorskip("triton")
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", _COMPILE_CHECK.format(tests=tests)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------- timings (script)

BENCH_SHAPES = [(256, 128), (64, 512), (16, 2048), (4, 8192), (1, 32768)]


def _time(fn, warmup=3, repeat=20, calls=1):
    """Median milliseconds per call of fn() over `repeat` timings with CUDA events, each
    around `calls` back-to-back calls (calls=1: one isolated call, the host's launch work
    included; calls > 1: the device's throughput, launches overlapping earlier kernels)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _kernel_times(fn):
    """Milliseconds per call spent in each CUDA kernel of fn(), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            rows[e.key[:40]] = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3 / 5
    return rows


def sweep_variants(default) -> list:
    """(name, LaunchSettings changes) of the kernels' launch settings compared by --sweep and --resources."""
    w1, w2, w3, w4 = default.num_warps
    bf16_tf32 = {torch.float32: "tf32x3", torch.bfloat16: "tf32", torch.float16: "tf32"}
    return [
        ("default", {}),
        ("prepare 2w", {"num_warps": (2, w2, w3, w4)}),
        ("scan 2w", {"num_warps": (w1, 2, w3, w4)}),
        ("prepare tf32", {"prepare_precision": bf16_tf32}),
        ("stage fp32", {"stage_dtype": dict.fromkeys(default.stage_dtype, torch.float32)}),
        ("bt32", {"block_t": 32}),
        ("2 parts a block", {"sub_blocks": 2}),
        ("4 parts a block", {"sub_blocks": 4}),
        ("recur. tf32x3", {"state_precision": "tf32x3"}),
        ("recur. tf32", {"state_precision": "tf32"}),
        ("recur. 2w", {"num_warps": (w1, w2, 2, w4)}),
        ("recur. 8w", {"num_warps": (w1, w2, 8, w4)}),
        ("output 2w", {"num_warps": (w1, w2, w3, 2)}),
        ("output 128 rows", {"output_rows": 128}),
    ]


def resources():
    """Registers, spilled bytes and shared memory of each kernel of the layer's bf16 inference
    path (64 x 512 tokens; the delta-rule kernels as the model launches them, from the
    input projection) for each --sweep variant, from ``ptxas -v`` on the PTX Triton
    generates for sm_90; no GPU needed. A kernel at 255 registers or spilling runs few
    programs at a time on an SM."""
    import re
    import tempfile

    from triton import knobs

    from lam_embed.ops import triton as T

    compiled = compile_only()
    flux = make_flux()
    default = T.DEFAULT_LAUNCH
    print(f"{'variant':26s} {'kernel':28s} {'warps':>5s} {'regs':>5s} {'spill st/ld B':>14s} {'smem B':>7s}")
    for name, change in sweep_variants(default):
        compiled.clear()
        launch_layer_kernels(torch.bfloat16, 64, 512, flux, dataclasses.replace(default, **change))
        seen = set()
        for kernel_name, kernel in compiled:
            if kernel_name in seen:
                continue
            seen.add(kernel_name)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(kernel.asm["ptx"])
                f.flush()
                info = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                      capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            print(f"{name:26s} {kernel_name:28s} {kernel.metadata.num_warps:5d} {regs.group(1) if regs else '?':>5s}"
                  f" {'/'.join(spill.groups()) if spill else '?':>14s} {kernel.metadata.shared:7d}", flush=True)


def bench(sweep: bool = False, compiled: bool = False):
    import time

    from lam_embed.ops import chunk_dual_state_delta_rule, compiled_dual_state_delta_rule
    from lam_embed.ops import triton as T

    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
    flux = make_flux(device=dev)
    cases = {}
    for B, L in BENCH_SHAPES:
        tensors, mask = make_inputs([L] * B, seed=B, device=dev)
        cases[(B, L)] = (tensors, mask)

    def run(fn, B, L, dtype=torch.float32, **kwargs):
        tensors, mask = cases[(B, L)]
        tensors = [t.to(dtype) for t in tensors]
        return lambda: fn(*tensors, mask, flux, chunk_size=128, **kwargs)

    def run_projection(B, L, launch=T.DEFAULT_LAUNCH):
        """The layer's inference path: the op from a bfloat16 input projection (conv and activations in the kernels)."""
        from lam_embed.ops.triton.layer import delta_rule_from_projection

        D = HEADS * HEAD_DIM
        g = torch.Generator().manual_seed(B)
        projected = torch.randn(B, L, 4 * D + 5 * HEADS + 4, generator=g).to(dev, torch.bfloat16)
        conv_weight = (0.5 * torch.randn(3 * D, 1, 4, generator=g)).to(dev, torch.bfloat16)
        mask = cases[(B, L)][1]
        return lambda: delta_rule_from_projection(projected, mask, conv_weight, flux, HEADS, 128, launch=launch)

    def table():
        print("\nms per call, 12 heads x 32, 32,768 tokens, fp32 inputs unless named (median of CUDA-event timings,"
              " warm-up excluded; 'b2b': 10 calls back to back, per call)")
        print(f"  {'B x L':>10s} {'triton':>9s} {'triton b2b':>11s} {'triton bf16':>12s} {'chunk':>9s} {'compiled':>9s}"
              f" {'max err':>9s} {'from projection bf16':>21s}")
        for (B, L), r in results.items():
            comp = f"{r['compiled']:9.3f}" if "compiled" in r else f"{'-':>9s}"
            print(f"  {f'{B}x{L}':>10s} {r['triton']:9.3f} {r['triton_b2b']:11.3f} {r['triton_bf16']:12.3f}"
                  f" {r['chunk']:9.3f} {comp} {r['err']:9.1e} {r['projection']:21.3f}", flush=True)

    results = {}
    with torch.no_grad():
        refs = {shape: run(chunk_dual_state_delta_rule, *shape)() for shape in BENCH_SHAPES}
        for B, L in BENCH_SHAPES:
            out = run(T.triton_dual_state_delta_rule, B, L)()
            err = (out - refs[(B, L)]).abs().max().item()
            results[(B, L)] = {
                "err": err,
                "triton": _time(run(T.triton_dual_state_delta_rule, B, L)),
                "triton_b2b": _time(run(T.triton_dual_state_delta_rule, B, L), repeat=10, calls=10),
                "triton_bf16": _time(run(T.triton_dual_state_delta_rule, B, L, torch.bfloat16)),
                "chunk": _time(run(chunk_dual_state_delta_rule, B, L), repeat=5),
                "projection": _time(run_projection(B, L)),
            }
        table()
        print("\nkernel times (ms per call, default settings):")
        for (B, L), name in [(shape, name) for shape in BENCH_SHAPES for name in ("op", "from projection")]:
            try:
                fn = run(T.triton_dual_state_delta_rule, B, L) if name == "op" else run_projection(B, L)
                rows = _kernel_times(fn)
                print(f"  {B}x{L} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(rows.items(), key=lambda kv: -kv[1])))
            except Exception as exc:
                print("  profiler failed:", type(exc).__name__, str(exc)[:200])
                break

        if sweep:
            default = T.DEFAULT_LAUNCH
            variants = sweep_variants(default)
            print("\nvariants: ms per call (max error vs chunk); the op in fp32, then the op from a bf16 projection")
            print(f"  {'variant':14s}" + "".join(f"{f'{B}x{L}':>22s}" for B, L in BENCH_SHAPES))
            for name, change in variants:
                launch = dataclasses.replace(default, **change)
                cells, cells_projection = [], []
                for B, L in BENCH_SHAPES:
                    try:
                        fn = run(T.triton_dual_state_delta_rule, B, L, launch=launch)
                        err = (fn() - refs[(B, L)]).abs().max().item()
                        cells.append(f"{_time(fn):8.3f} ({err:.1e})")
                        cells_projection.append(f"{_time(run_projection(B, L, launch)):8.3f}")
                    except Exception as exc:  # a variant that does not compile or fit
                        cells.append(f"{type(exc).__name__[:20]:>20s}")
                        cells_projection.append("-")
                print(f"  {name:14s}" + "".join(f"{c:>22s}" for c in cells), flush=True)
                print(f"  {'':14s}" + "".join(f"{c:>22s}" for c in cells_projection), flush=True)

    if not compiled:
        return
    # torch.compile last: its compilation takes the longest.
    start = time.time()
    with torch.no_grad():
        for B, L in BENCH_SHAPES:
            try:
                results[(B, L)]["compiled"] = _time(run(compiled_dual_state_delta_rule, B, L), repeat=5)
            except Exception as exc:
                print("compiled failed:", type(exc).__name__, str(exc)[:200])
                break
            print(f"compiled {B}x{L}: {results[(B, L)]['compiled']:.3f} ms ({time.time() - start:.0f} s so far)", flush=True)
            if time.time() - start > 90:
                print("compiled: stopped after 90 s")
                break
    table()


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench(sweep="--sweep" in sys.argv, compiled="--compiled" in sys.argv)
    elif "--resources" in sys.argv:
        resources()
