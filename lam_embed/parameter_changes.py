"""What a parameter's version counter does not show, for what LAM keeps between calls
(the weights each layer stacks, DualStateDeltaNet.stacked_weights; the CUDA graphs,
inference/cuda_graphs.py): optimizer steps (fused optimizers update parameters in place without
moving their counters) and parameters registered anywhere (a graph reads parameters where
they were when it was captured, and replacing one by another moves no counter). The torch
hooks that count them are installed by the first forward that keeps weights or replays a
graph (``install_change_hooks``), not on import.
"""

from __future__ import annotations

import functools
from operator import attrgetter

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_version = attrgetter("_version")
_optimizer_steps = 0
_parameter_registrations = 0


def version_sum(tensors) -> int:
    """The sum of the tensors' version counters: counters only grow, so the sum moves when
    any of them moves (an in-place write). Tensors made under ``torch.inference_mode`` have
    no counter and count as 0: an in-place write to one goes unseen, as a write through
    ``param.data`` does. The common case loops in C (``map``)."""
    try:
        return sum(map(_version, tensors))
    except RuntimeError:  # "Inference tensors do not track version counter"
        return sum(t._version for t in tensors if not t.is_inference())


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _count_parameter_registration(module, name, param) -> None:
    global _parameter_registrations
    _parameter_registrations += 1


@functools.cache
def install_change_hooks() -> None:
    """Start counting optimizer steps and parameter registrations (once per process).
    Before this, nothing is kept that the counts would have to invalidate."""
    register_optimizer_step_post_hook(_count_optimizer_step)
    torch.nn.modules.module.register_module_parameter_registration_hook(_count_parameter_registration)


def optimizer_steps() -> int:
    """Optimizer steps taken since install_change_hooks."""
    return _optimizer_steps


def parameter_registrations() -> int:
    """Parameters registered on any module since install_change_hooks."""
    return _parameter_registrations


class KeepsDerivedWeights(torch.nn.Module):
    """A module that keeps tensors derived from its parameters between inference calls (the
    stacked input projection, int8 copies of weights): ``kept`` builds one again when a
    source parameter moves or changes in place (its version counter) or after any optimizer
    step. All are dropped on ``.to()``, ``.half()``, ... and when training starts."""

    def kept(self, name: str, sources, build):
        """``build()``, kept under ``name`` until one of ``sources`` (tensors) changes."""
        install_change_hooks()
        key = (optimizer_steps(), version_sum(sources), *((p.data_ptr(), p.dtype) for p in sources))
        store = self.__dict__.setdefault("_kept", {})
        cached = store.get(name)
        if cached is None or cached[0] != key:
            cached = store[name] = (key, build())
        return cached[1]

    def kept_value(self, name: str):
        """What ``kept`` holds under ``name`` now, or None."""
        cached = self.__dict__.get("_kept", {}).get(name)
        return None if cached is None else cached[1]

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_kept", None)  # never keep copies of the old tensors
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode:  # training moves the weights; eval() (each encode call) keeps them
            self.__dict__.pop("_kept", None)
        return super().train(mode)
