"""The backend registry (lam_embed/backends.py): what each delta_impl runs on CPU, the errors
for a backend on the wrong device, that a model forward selects the backend once, and the
background preparation of the Triton kernels."""

import functools
import importlib.util
import threading

import pytest
import torch

from lam_embed import LAMConfig, LAMModel, backends
from lam_embed.backends import BACKEND_NAMES, BACKENDS, Backend, select_backend

CPU = torch.device("cpu")


def small_config(**fields):
    return LAMConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, **fields)


def test_every_backend_is_a_config_choice_and_auto_is_not_a_backend():
    assert BACKEND_NAMES == ("auto", *BACKENDS)
    assert "auto" not in BACKENDS
    for name in BACKEND_NAMES:
        assert small_config(delta_impl=name).delta_impl == name
    with pytest.raises(ValueError, match="delta_impl must be one of"):
        small_config(delta_impl="fast")


@pytest.mark.parametrize(("delta_impl", "dtype", "wants_grad", "fuse", "want"), [
    ("auto", torch.float32, False, True, Backend("numba", "numba", "chunk")),
    ("numba", torch.float32, False, True, Backend("numba", "numba", "chunk")),
    ("auto", torch.float32, True, True, Backend("chunk", "eager", "chunk")),  # gradients: no fused kernel
    ("auto", torch.float64, False, True, Backend("chunk", "eager", "chunk")),  # the kernel is float32
    ("auto", torch.float32, False, False, Backend("chunk", "eager", "chunk")),  # fuse_layer_code off
    ("numba", torch.float32, True, True, Backend("chunk", "eager", "chunk")),
    ("chunk", torch.float32, False, True, Backend("chunk", "eager", "chunk")),
    ("naive", torch.float32, False, True, Backend("naive", "eager", "naive")),
    ("compiled", torch.float32, False, True, Backend("compiled", "eager", "compiled")),  # layer code compiled on CUDA only
])
def test_cpu_selection(monkeypatch, delta_impl, dtype, wants_grad, fuse, want):
    monkeypatch.setattr(backends, "load_numba", lambda: object())  # as if numba were installed
    config = small_config(delta_impl=delta_impl, fuse_layer_code=fuse)
    assert select_backend(config, CPU, dtype, wants_grad, training=False) == want


def test_numba_needs_no_autocast_and_no_state_dropout_in_training(monkeypatch):
    monkeypatch.setattr(backends, "load_numba", lambda: object())
    config = small_config(state_dropout=0.1)
    assert select_backend(config, CPU, torch.float32, False, training=False).layer_code == "numba"
    assert select_backend(config, CPU, torch.float32, False, training=True).layer_code == "eager"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert select_backend(config, CPU, torch.float32, False, training=False).layer_code == "eager"


def test_auto_without_numba_is_chunk(monkeypatch):
    monkeypatch.setattr(backends, "load_numba", lambda: None)
    assert select_backend(small_config(), CPU, torch.float32, False, False) == Backend("chunk", "eager", "chunk")


def test_triton_on_cpu_is_an_error_naming_the_device():
    with pytest.raises(ValueError, match="delta_impl='triton' runs on CUDA tensors only, got tensors on cpu"):
        select_backend(small_config(delta_impl="triton"), CPU, torch.float32, False, False)


def test_a_forward_selects_its_backend_once_for_every_layer(monkeypatch):
    """The choice is made once per forward and every layer runs the one chosen."""
    torch.manual_seed(0)
    model = LAMModel(small_config(delta_impl="chunk")).eval()
    calls, seen = [], []
    real_select = backends.select_backend

    def counting_select(*args, **kwargs):
        calls.append(args)
        return real_select(*args, **kwargs)

    from lam_embed import modeling_lam
    from lam_embed.layers import dual_state_delta_net

    monkeypatch.setattr(modeling_lam, "select_backend", counting_select)
    monkeypatch.setattr(dual_state_delta_net, "select_backend", counting_select)
    for layer in model.layers:
        real_forward = layer.delta_net.forward
        monkeypatch.setattr(layer.delta_net, "forward",
                            lambda x, mask, backend=None, f=real_forward: seen.append(backend) or f(x, mask, backend))
    ids = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 1
    assert seen == [Backend("chunk", "eager", "chunk")] * 2


def test_a_model_with_a_trainable_parameter_wants_gradients():
    """Under autograd a model whose parameters want gradients never takes a fused
    inference path (it has no backward)."""
    model = LAMModel(small_config())
    ids = torch.randint(0, 1000, (1, 8))
    assert model.select_backend(ids).layer_code == "eager"
    with torch.no_grad():
        assert model.select_backend(ids).layer_code in ("numba", "eager")  # numba where it imports
    model.requires_grad_(False)
    model.layers[1].ffn_out.weight.requires_grad_(True)  # one trainable parameter is enough
    assert model.select_backend(ids).layer_code == "eager"


def _fresh_preparation(monkeypatch, cuda_build: bool):
    """backends as in a new process, on a torch built for CUDA or not."""
    monkeypatch.setattr(backends, "_triton_preparation", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8" if cuda_build else None)
    monkeypatch.setattr(torch.version, "hip", None)
    backends._import_triton.cache_clear()


@pytest.mark.parametrize("delta_impl", ["auto", "triton"])
def test_a_model_prepares_triton_in_the_background_and_load_triton_waits_for_it(monkeypatch, delta_impl):
    _fresh_preparation(monkeypatch, cuda_build=True)
    started = threading.Event()
    release = threading.Event()
    real_import = backends._import_triton.__wrapped__

    def slow_import():
        started.set()
        release.wait(5)
        return real_import()

    monkeypatch.setattr(backends, "_import_triton", functools.cache(slow_import))
    LAMModel(small_config(delta_impl=delta_impl))
    if importlib.util.find_spec("triton") is None:
        assert backends._triton_preparation is None and backends.load_triton() is None
        return
    preparation = backends._triton_preparation
    assert started.wait(5) and preparation.is_alive()
    LAMModel(small_config(delta_impl=delta_impl))  # once a process
    assert backends._triton_preparation is preparation
    threading.Timer(0.2, release.set).start()
    module = backends.load_triton()  # waits for the thread, then takes its result
    assert not preparation.is_alive()
    assert module is not None and module is backends.load_triton()
    assert backends._import_triton.cache_info().misses == 1  # imported (and Triton's key computed) once
    from triton.runtime.cache import triton_key
    assert triton_key.cache_info().currsize == 1


@pytest.mark.parametrize(("delta_impl", "cuda_build", "triton_installed"),
                         [("numba", True, True), ("chunk", True, True), ("auto", False, True), ("auto", True, False)])
def test_no_preparation_where_the_kernels_cannot_run(monkeypatch, delta_impl, cuda_build, triton_installed):
    _fresh_preparation(monkeypatch, cuda_build)
    if not triton_installed:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: None if name == "triton" else find_spec(name, *args))
    LAMModel(small_config(delta_impl=delta_impl))
    assert backends._triton_preparation is None
