"""CUDA graphs of the LAM forward pass, for inference on CUDA.

A LAM forward launches about 100 kernels, and on a GPU the Python and launch work on
the CPU takes longer than the kernels themselves up to a few thousand tokens a batch
(README, "Speed"). A CUDA graph replays the captured launches in one call. Each
graph serves one input shape, so lengths are rounded up to a multiple of
``LENGTH_STEP``: LAM's output at a valid token does not depend on padding after it
(the layer is causal, and every mean is over valid tokens), so an input padded to its
bucket gives the same values at its own positions.

A shape is captured the second time it is seen (the first call runs eagerly and
compiles the Triton kernels, which cannot happen during a capture); a shape seen once
costs nothing. Graphs are dropped when any parameter changes (an optimizer step, an
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


def bucket_length(length: int) -> int:
    """The padded length whose graph serves inputs of ``length`` positions."""
    return -(-length // LENGTH_STEP) * LENGTH_STEP


class GraphedForward:
    """One captured forward: static input buffers, the graph, its static output."""

    def __init__(self, encode, batch: int, length: int, device: torch.device, pool):
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.types = torch.zeros_like(self.ids)
        self.mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        # An eager run first: the Triton kernels compile for this length's specialisation
        # (a capture cannot compile), and the weights stacked by each layer are built
        # outside the graph's memory pool.
        encode(self.ids, self.types, self.mask)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = encode(self.ids, self.types, self.mask)

    def __call__(self, input_ids, token_type_ids, mask) -> torch.Tensor:
        length = input_ids.shape[1]
        self.ids[:, :length].copy_(input_ids)
        self.types[:, :length].copy_(token_type_ids)
        self.mask[:, :length].copy_(mask)
        self.mask[:, length:] = False  # a longer input of this bucket may have set it
        self.graph.replay()
        return self.out[:, :length].clone()  # the next replay overwrites self.out


class ForwardGraphs:
    """The CUDA graphs of one model's forward, keyed by input shape and precision."""

    def __init__(self):
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.fingerprint = None
        self.pool = None

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    @staticmethod
    def parameters_fingerprint(model: torch.nn.Module, optimizer_steps: int) -> tuple:
        """What a graph depends on beyond its inputs: where each parameter lives and its
        version counter (fused optimizers update parameters without moving it, hence
        the count of optimizer steps)."""
        return optimizer_steps, tuple((p.data_ptr(), p._version) for p in model.parameters())

    def __call__(self, model, encode, input_ids, token_type_ids, mask, optimizer_steps: int):
        """``encode(ids, types, mask)`` through a graph for this shape; None when this
        shape is seen for the first time (the caller then runs it eagerly)."""
        fingerprint = self.parameters_fingerprint(model, optimizer_steps)
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint
        batch, length = input_ids.shape
        key = (batch, bucket_length(length), input_ids.device, torch.is_inference_mode_enabled(),
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        graphed = self.graphs.get(key)
        if graphed is None:
            if key not in self.seen:
                self.seen.add(key)
                return None
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            logger.debug("capturing a CUDA graph of the LAM forward for batch %d, length %d", batch, key[1])
            graphed = GraphedForward(encode, batch, key[1], input_ids.device, self.pool)
            self.graphs[key] = graphed
            if len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return graphed(input_ids, token_type_ids, mask)
