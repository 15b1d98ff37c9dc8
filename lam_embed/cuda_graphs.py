"""CUDA graphs of the LAM forward pass, for inference on CUDA.

A LAM forward launches about 100 kernels, and the Python and launch work on the CPU
takes about as long as the kernels of a batch of short sentences, longer on a machine
with a slow host (README, "Speed"). A CUDA graph replays the captured launches in one call. Each
graph serves one input shape, so lengths are rounded up to a multiple of
``LENGTH_STEP``: LAM's output at a valid token does not depend on padding after it
(the layer is causal, and every mean is over valid tokens), so an input padded to its
bucket gives the same values at its own positions.

Graphs serve inputs of at most one chunk (``config.chunk_size`` positions), the
sentence lengths where launch work dominates. On longer inputs the GPU work of a
forward outlasts its launches, and replays measured slower than eager forwards on an
H200 (7.25 against 6.55 ms at 64 x 512 tokens, commit ea6d5da): a replay starts only
once the host has done its own work, where eager kernels start at once.

A shape is captured the second time it is seen (a capture costs about two forwards);
a shape seen once costs nothing. The graph also computes the summary of the input
values that ``LAMModel.check_values`` reads, so a bad input raises as in the eager
forward. Graphs are dropped when any parameter changes (an optimizer step, an
in-place update, a replaced or moved tensor), and the oldest when more than
``MAX_GRAPHS`` are kept. All graphs of a model share one memory pool: they replay one
at a time on one stream, and each output is copied out before the next replay.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

logger = logging.getLogger(__name__)

LENGTH_STEP = 16
MAX_GRAPHS = 32


def bucket_length(length: int, chunk_size: int) -> int:
    """The padded length whose graph serves inputs of ``length`` <= ``chunk_size`` positions:
    a multiple of LENGTH_STEP, or ``chunk_size`` (padding past it would add a chunk)."""
    return min(-(-length // LENGTH_STEP) * LENGTH_STEP, chunk_size)


class GraphedForward:
    """One captured forward: static input buffers, the graph, its static outputs."""

    def __init__(self, forward, batch: int, length: int, device: torch.device, pool):
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        self.types = torch.zeros_like(self.ids)
        # An eager run first: the Triton kernels compile for this length's specialisation
        # (a capture cannot compile), and the weights stacked by each layer are built
        # outside the graph's memory pool.
        forward(self.ids, self.mask, self.types)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader pinning memory while a
        # trainer evaluates, say) are not part of the capture and must not fail it.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out, self.summary = forward(self.ids, self.mask, self.types)

    def __call__(self, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
        length = input_ids.shape[1]
        for buffer, values in ((self.ids, input_ids), (self.mask, attention_mask), (self.types, token_type_ids)):
            buffer[:, :length].copy_(values)
            if length < buffer.shape[1]:
                buffer[:, length:] = 0  # padding: a longer input of this bucket left its values there
        self.graph.replay()
        # The next replay overwrites both outputs: the caller copies the summary out at once.
        return self.out[:, :length].clone(), self.summary


class ForwardGraphs:
    """The CUDA graphs of one model's forward, keyed by input shape and precision."""

    def __init__(self):
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.pool = None
        self.changes = None
        self.parameters: list[torch.Tensor] = []
        self.fingerprint = None

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    def _parameters_changed(self, model: torch.nn.Module, changes: tuple) -> bool:
        """Whether a parameter moved or changed since the last call. ``changes`` counts the
        events that a version counter does not show: optimizer steps (fused optimizers
        update parameters without moving it) and parameters registered anywhere (a
        parameter replaced by another); on a new count the parameter list is read again.
        Otherwise the parameters' addresses and version counters tell."""
        if changes != self.changes:
            self.changes = changes
            self.parameters = list(model.parameters())
        fingerprint = changes, tuple((p.data_ptr(), p._version) for p in self.parameters)
        changed = fingerprint != self.fingerprint
        self.fingerprint = fingerprint
        return changed

    def __call__(self, model, forward, input_ids, attention_mask, token_type_ids, changes: tuple, chunk_size: int):
        """``forward(ids, mask, types)`` -> (last hidden state, value summary) through a graph
        for this shape; None when the shape is seen for the first time (the caller then
        runs it eagerly)."""
        if self._parameters_changed(model, changes):
            self.clear()
        batch, length = input_ids.shape
        key = (batch, bucket_length(length, chunk_size), input_ids.device, torch.is_inference_mode_enabled(),
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        graphed = self.graphs.get(key)
        if graphed is None:
            if key not in self.seen:
                self.seen.add(key)
                return None
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            logger.debug("capturing a CUDA graph of the LAM forward for batch %d, length %d", batch, key[1])
            graphed = GraphedForward(forward, batch, key[1], input_ids.device, self.pool)
            self.graphs[key] = graphed
            if len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return graphed(input_ids, attention_mask, token_type_ids)
