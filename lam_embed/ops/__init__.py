"""Implementations of the dual-state delta rule and the dispatch between them.

- ``naive``: token-level reference (naive.py), the test oracle;
- ``chunk``: chunked form with the exact triangular solve (chunk.py);
- ``compiled``: the chunked form with its two hot functions under torch.compile;
- ``triton``: fused kernels (triton/), CUDA only.

Which one a model runs is decided in lam_embed/backends.py; here an implementation is
named explicitly.
"""

from __future__ import annotations

import functools
import logging

import torch

from .chunk import chunk_dual_state_delta_rule, intra_chunk, state_step
from .common import l2norm
from .naive import naive_dual_state_delta_rule

logger = logging.getLogger(__name__)

__all__ = ["IMPLEMENTATIONS", "chunk_dual_state_delta_rule", "dual_state_delta_rule", "naive_dual_state_delta_rule"]


@functools.cache
def _compiled_functions():
    # dynamic=True: one graph serves every batch size and number of chunks.
    return torch.compile(intra_chunk, dynamic=True), torch.compile(state_step, dynamic=True)


def compiled_dual_state_delta_rule(*args, **kwargs):
    intra_fn, step_fn = _compiled_functions()
    return chunk_dual_state_delta_rule(*args, intra_fn=intra_fn, step_fn=step_fn, **kwargs)


def _triton_dual_state_delta_rule(*args, **kwargs):
    try:
        from .triton import triton_dual_state_delta_rule
    except ImportError as err:
        raise NotImplementedError(
            "delta_impl='triton' needs the fused kernels in lam_embed/ops/triton/ and the triton package; "
            f"it is not available here ({err}). Use delta_impl='chunk' or 'compiled'."
        ) from err
    return triton_dual_state_delta_rule(*args, **kwargs)


IMPLEMENTATIONS = {
    "naive": naive_dual_state_delta_rule,
    "chunk": chunk_dual_state_delta_rule,
    "compiled": compiled_dual_state_delta_rule,
    "triton": _triton_dual_state_delta_rule,
}


def check_impl(impl: str, device: torch.device) -> None:
    """Raise ValueError unless ``impl`` names an implementation that runs on ``device``."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {sorted(IMPLEMENTATIONS)}, got {impl!r}")
    if impl == "triton" and device.type != "cuda":
        raise ValueError(f"impl='triton' runs on CUDA tensors only, got tensors on {device}")


def dual_state_delta_rule(q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow, mask, flux, *,
                          chunk_size: int = 128, state_dropout: float = 0.0, training: bool = False,
                          impl: str = "chunk", qk_l2norm: bool = False,
                          initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
                          state_after_chunks: torch.Tensor | None = None):
    """Dual-state delta rule of docs/SPEC.md; returns O (B, H, L, d) in q's dtype.

    ``initial_state`` and ``state_after_chunks`` carry the states across inputs (see
    ``naive_dual_state_delta_rule``; every implementation); with
    ``state_after_chunks`` the result is (O, (S_fast, S_slow)), the states in float32.

    The state math runs in float32 whatever the input dtype and autocast say.
    ``qk_l2norm``: q and k are given unnormalised and the op makes each head's query
    and key a unit vector first, in float32 (as fla's ``use_qk_l2norm_in_kernel``);
    O is then float32, the dtype of the normalised q. The fused kernel normalises on
    load, so float32 copies of q and k never exist in memory.
    """
    check_impl(impl, q.device)
    carried = initial_state is not None or state_after_chunks is not None
    fn = IMPLEMENTATIONS[impl]
    dtype = torch.float32 if qk_l2norm else q.dtype
    length = q.shape[2]
    if length == 0:
        out = torch.zeros_like(q, dtype=dtype)
        if state_after_chunks is None:
            return out
        B, H, _, d = q.shape
        zero = q.new_zeros(B, H, d, d, dtype=torch.float32)
        return out, (initial_state if initial_state is not None else (zero, zero))
    # An input of at most one chunk is a single chunk of its own length: padding it
    # to chunk_size would change nothing but the cost. Carried inputs (the pieces of a
    # streamed document, of any length) keep chunk_size, so that the fused kernels see
    # one chunk shape and are compiled once for them.
    if not carried:
        chunk_size = min(chunk_size, length)
    kwargs = {"chunk_size": chunk_size, "state_dropout": state_dropout, "training": training}
    if carried:
        kwargs.update(initial_state=initial_state, state_after_chunks=state_after_chunks)
    tensors = (q, k, v, beta, decay_fast, decay_slow, gate_fast, gate_slow)
    with torch.autocast(q.device.type, enabled=False):
        if impl == "triton":
            # The kernels convert on load; float32 copies would only cost memory.
            out = fn(*tensors, mask, flux, qk_l2norm=qk_l2norm, **kwargs)
        else:
            tensors = [t.float() for t in tensors]
            if qk_l2norm:
                # Contiguous first: the norm of a (B, H, L, d) view of a (B, L, H, d) tensor
                # is several times slower, and the chunked form copies q and k to this layout anyway.
                tensors[:2] = l2norm(tensors[0].contiguous()), l2norm(tensors[1].contiguous())
            out = fn(*tensors, mask, flux, **kwargs)
    if state_after_chunks is not None:
        out, states = out
        return out.to(dtype), states
    return out.to(dtype)
