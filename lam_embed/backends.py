"""How a LAM forward pass runs: the registry of backends and the one place where
``LAMConfig.delta_impl`` (and "auto") is turned into the code that runs.

A backend fixes two things: the implementation of the dual-state delta rule (an op of
``lam_embed.ops``) and how the layer code around it runs ("eager" PyTorch, under
torch.compile, or inside fused kernels). ``LAMModel.forward`` selects the backend once per
call and hands it to every layer; a layer called on its own selects it the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import threading

import torch

logger = logging.getLogger(__name__)

# name -> what it runs. Every backend computes the same function (docs/SPEC.md); the
# tests hold each to the "naive" reference.
BACKENDS = {
    "naive": "the token-by-token reference (ops/naive.py), eager layer code; for tests",
    "chunk": "the chunked form with an exact triangular solve (ops/chunk.py), eager layer code",
    "compiled": "the chunked form and, on CUDA, the layer code under torch.compile",
    "triton": "CUDA only: fused Triton kernels (ops/triton/); with gradients the layer code "
              "runs under torch.compile and the backward through the chunked form",
    "numba": "CPU inference in float32: one numba kernel for the delta rule, output norm and "
             "gate of a layer (ops/numba.py); with gradients or another dtype, 'chunk'",
}
BACKEND_NAMES = ("auto", *BACKENDS)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A selected backend.

    name: the backend (never "auto").
    layer_code: "eager", "compiled" (torch.compile), "triton" (the delta rule, output
        norm and gate inside the Triton kernels, and Triton kernels for the embeddings
        and residual LayerNorms) or "numba" (the delta rule, output norm and gate in the
        numba kernel).
    delta_impl: the op of lam_embed.ops that "eager" and "compiled" layer code calls.
    int8_products: the numba layer code runs the layers' matrix products in int8
        (LAMConfig.cpu_int8, lam_embed/inference/int8.py).
    """

    name: str
    layer_code: str
    delta_impl: str
    int8_products: bool = False


@functools.cache
def _import_triton():
    try:
        from .ops import triton
    except ImportError:
        return None
    # Triton's own cache key: a SHA-256 of its compiler's sources and of libtriton (whose
    # packages it imports to list them), computed once a process before the first compiled
    # kernel is looked up: 0.4-0.5 s of a process's first forward on a GPU host, imports aside.
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # pragma: no cover - another triton layout: the first launch computes it
        pass
    else:
        triton_key()
    return triton


# The thread of prepare_triton, once started (one a process).
_triton_preparation: threading.Thread | None = None
_triton_preparation_lock = threading.Lock()


def prepare_triton(config) -> None:
    """Import the fused kernels and compute Triton's cache key in a background thread, where
    this torch is built for a GPU, triton is installed and ``config`` may run the kernels:
    work that a process's first forward on CUDA would otherwise do in the caller's thread
    (docs/performance.md). LAMModel starts it when built, so that it runs while the weights
    load and the first texts are tokenized; load_triton waits for it. Once a process."""
    global _triton_preparation
    if config.delta_impl not in ("auto", "triton") or (torch.version.cuda is None and torch.version.hip is None):
        return
    with _triton_preparation_lock:
        if _triton_preparation is not None or importlib.util.find_spec("triton") is None:
            return
        _triton_preparation = threading.Thread(target=_import_triton, name="lam-prepare-triton", daemon=True)
        _triton_preparation.start()


def load_triton():
    """The package lam_embed.ops.triton, or None where triton does not import; waits for
    prepare_triton's thread where one runs (the key it computes is cached without a lock)."""
    if _triton_preparation is not None:
        _triton_preparation.join()
    return _import_triton()


@functools.cache
def load_numba():
    """The module lam_embed.ops.numba, or None where numba does not import or cannot
    compile (the eager code then runs: slower on CPU, same results)."""
    try:
        from .ops import numba
    except ImportError:
        return None
    except Exception as err:  # e.g. numba finds no writable folder for its cache
        logger.warning("the CPU kernel of lam_embed/ops/numba.py is unavailable (%s: %s); using the eager code",
                       type(err).__name__, err)
        return None
    return numba


@functools.cache
def _int8_runs() -> bool:
    from .inference import int8

    if not int8.supported():
        logger.warning("LAMConfig.cpu_int8: this torch (%s) has no oneDNN int8 products; the products stay float32",
                       torch.__version__)
        return False
    return True


def _triton_runs(config) -> bool:
    """Whether the fused kernels import and fit the head size (their tiles: a power of two >= 16)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return load_triton() is not None and head_dim >= 16 and not head_dim & (head_dim - 1)


def select_backend(config, device: torch.device, dtype: torch.dtype, wants_grad: bool, training: bool) -> Backend:
    """The backend of a forward pass on ``device`` with activations of ``dtype``.

    "auto" is the fused kernels on CUDA ("triton", or "compiled" without triton), the
    numba kernel for float32 CPU inference, and "chunk" elsewhere (the fastest measured
    in each case: docs/performance.md). ``config.fuse_layer_code`` False keeps the layer
    code eager whatever the backend. The fused inference paths have no autograd and no
    state dropout, so with ``wants_grad`` (or state dropout while training) "triton"
    runs its layer code under torch.compile and "numba" becomes "chunk". ``config.cpu_int8``
    runs the matrix products of the "numba" layer code in int8.
    """
    name = config.delta_impl
    if name not in BACKEND_NAMES:
        raise ValueError(f"LAMConfig.delta_impl must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            name = "triton" if load_triton() is not None else "compiled"
        else:
            name = "numba" if device.type == "cpu" and config.fuse_layer_code else "chunk"
    if name == "triton" and device.type != "cuda":
        raise ValueError(f"delta_impl='triton' runs on CUDA tensors only, got tensors on {device}")
    if name == "numba" and device.type != "cpu":
        raise ValueError(f"delta_impl='numba' runs on CPU tensors only, got tensors on {device}")

    fused = config.fuse_layer_code
    if name == "numba":
        usable = (fused and dtype == torch.float32 and not wants_grad and not torch.is_autocast_enabled("cpu")
                  and not (training and config.state_dropout > 0) and load_numba() is not None)
        if not usable:
            return Backend("chunk", "eager", "chunk")
        return Backend("numba", "numba", "chunk", int8_products=config.cpu_int8 and _int8_runs())
    if name in ("naive", "chunk") or not fused or device.type != "cuda":
        return Backend(name, "eager", name)
    if name == "compiled":
        return Backend(name, "compiled", "compiled")
    # "triton"
    if wants_grad or (training and config.state_dropout > 0) or not _triton_runs(config):
        return Backend(name, "compiled", "triton")
    return Backend(name, "triton", "triton")


def carried_backend(config, device: torch.device, wants_grad: bool) -> Backend:
    """The backend of a forward from or to a carried state (lam_embed/state.py): eager layer
    code (it gathers the convolution tail and the states at each sample's own chunk) around
    the Triton kernels on CUDA at inference, which take the carried states as initial
    states, and around the chunked form elsewhere ("naive" where the config asks for the
    reference)."""
    name = config.delta_impl
    if name == "naive":
        return Backend("naive", "eager", "naive")
    if device.type == "cuda" and name in ("auto", "triton") and not wants_grad and _triton_runs(config):
        return Backend("triton", "eager", "triton")
    return Backend("chunk", "eager", "chunk")
