"""CUDA graphs of the LAM forward pass, for inference on CUDA.

A LAM forward launches about 100 kernels, and the Python and launch work on the CPU
takes longer than the kernels of many input shapes: on an H200 the GPU was busy for
only 55% of an eager forward of 64 x 512 tokens and 44% of one of 4 x 8,192 tokens
(docs/performance.md). A CUDA graph replays the captured launches in one call. Each
graph serves one input shape, so lengths are
rounded up (``bucket_length``): LAM's output at a valid token does not depend on padding
after it (the layer is causal, every mean is over valid tokens, and a chunk without
valid tokens leaves the states as they were), so an input padded to its bucket gives
the same values at its own positions.

A shape is captured the second time it is seen (a capture costs about two forwards);
a shape seen once costs nothing. The graph also computes the summary of the input
values that ``input_checks.check_values`` reads, so a bad input raises as in the eager
forward. Graphs are dropped when any parameter changes (an optimizer step, an
in-place update, a replaced or moved tensor; a replay that read changed parameters is
thrown away and the forward runs eagerly), and the oldest when more than
``MAX_GRAPHS`` are kept or their static buffers hold more than ``MAX_GRAPH_TOKENS``
tokens; a shape of more than ``MAX_SHAPE_TOKENS`` tokens runs eagerly, and so does a
shape whose graph was pushed out (see ForwardGraphs.evicted). All graphs of a model share
one memory pool: they replay one at a time on one stream, and each output is copied out
before the next replay. Inside a graph the batch may run in parts on several streams
(LAMConfig.graph_streams): the capture records them as parallel branches.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ..parameter_changes import version_sum

logger = logging.getLogger(__name__)

LENGTH_STEP = 16
MAX_GRAPHS = 32
# Each kept graph holds its input and output buffers (an output of 32,768 tokens is 25 MB
# in bfloat16): past this many tokens in all, the oldest graphs go.
MAX_GRAPH_TOKENS = 1 << 18
# Shapes above this run eagerly: their kernels outlast the launch work (8 ms of GPU work
# or more against a few ms of host work on an H200), a capture, which follows an eager
# run, would hold a second copy of their working memory in the graphs' pool, and at least
# four of the largest graphs fit in MAX_GRAPH_TOKENS: with fewer, a pass over long
# documents in batches of ~130k tokens kept capturing shapes that pushed each other out
# (a capture costs about two forwards), and its warm passes ran slower than its first.
MAX_SHAPE_TOKENS = MAX_GRAPH_TOKENS // 4
MAX_SEEN = 4096  # shapes remembered as seen once; past it, the memory starts again

_data_ptr = torch.Tensor.data_ptr


def bucket_length(length: int, chunk_size: int) -> int:
    """The padded length whose graph serves inputs of ``length`` positions.

    Up to ``chunk_size``: a multiple of LENGTH_STEP, never past ``chunk_size`` (an input of
    at most one chunk is one chunk of its own length; padding past it would add a chunk).
    Longer: a multiple of LENGTH_STEP or of 1/16 of the power of two at or above the
    length, whichever is larger, so a bucket pads by at most about 12% and an octave of
    lengths has at most 16 buckets (many inputs of similar lengths share a graph)."""
    if length <= chunk_size:
        return min(-(-length // LENGTH_STEP) * LENGTH_STEP, chunk_size)
    step = max(LENGTH_STEP, (1 << (length - 1).bit_length()) // 16)
    return -(-length // step) * step


class GraphedForward:
    """One captured forward: static input buffers, the graph, its static outputs."""

    def __init__(self, forward, batch: int, length: int, device: torch.device, pool, extras=()):
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        self.types = torch.zeros_like(self.ids)
        self.types_zero = True  # whether self.types holds zeros only (token_type_ids None needs no copy)
        # Inputs of fixed shape besides the token rows (a carried state), as given.
        self.extras = [torch.zeros_like(e) for e in extras]
        # An eager run first: the Triton kernels compile for this length's specialisation
        # (a capture cannot compile), and the weights stacked by each layer are built
        # outside the graph's memory pool.
        forward(self.ids, self.mask, self.types, *self.extras)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader pinning memory while a
        # trainer evaluates, say) are not part of the capture and must not fail it.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out, *self.rest = forward(self.ids, self.mask, self.types, *self.extras)

    def __call__(self, input_ids, attention_mask, token_type_ids, *extras) -> tuple:
        """Replay for these inputs (``token_type_ids`` None: all zero): (the last hidden state,
        then forward's other outputs). The inputs go into the static buffers in one
        multi-tensor copy, and the padding after them is zeroed: a longer input of this
        bucket left its values there."""
        length = input_ids.shape[1]
        sources, buffers = [input_ids, attention_mask], [self.ids, self.mask]
        if token_type_ids is not None:
            sources.append(token_type_ids)
            buffers.append(self.types)
            self.types_zero = False
        elif not self.types_zero:
            self.types.zero_()
            self.types_zero = True
        if length == self.ids.shape[1]:
            torch._foreach_copy_(buffers + self.extras, sources + list(extras))
        else:
            torch._foreach_copy_([b[:, :length] for b in buffers] + self.extras, sources + list(extras))
            torch._foreach_zero_([b[:, length:] for b in buffers])
        self.graph.replay()
        # The next replay overwrites the other outputs: the caller copies them out at once.
        return self.out[:, :length].clone(), *self.rest


class ForwardGraphs:
    """The CUDA graphs of one model's forward, keyed by input shape and precision."""

    def __init__(self):
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()
        # Keys whose graph went to make room: run eagerly from then on. A workload of more
        # shapes than the graphs hold would otherwise capture each of them again on every
        # pass, paying a capture for each replay it saves.
        self.evicted: set = set()
        self.pool = None
        self.changes = None
        self.parameters: list[torch.Tensor] = []
        self.fingerprint = None

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.evicted.clear()
        self.pool = None

    def tokens(self) -> int:
        """Tokens in the buffers of the kept graphs (batch x padded length, summed)."""
        return sum(key[0] * key[1] for key in self.graphs)

    def _parameters_changed(self) -> bool:
        """Whether a parameter moved or was written in place since the last check: their
        addresses (read in C, ``map``) and version counters (``version_sum``)."""
        fingerprint = tuple(map(_data_ptr, self.parameters)), version_sum(self.parameters)
        changed = fingerprint != self.fingerprint
        self.fingerprint = fingerprint
        return changed

    def __call__(self, model, forward, input_ids, attention_mask, token_type_ids, changes: tuple, chunk_size: int,
                 tensors_read=None, extras=()):
        """``forward(ids, mask, types, *extras)`` -> (last hidden state, other outputs...)
        through a graph for this shape; None when the shape is seen for the first time, holds
        more than MAX_SHAPE_TOKENS tokens, had its graph pushed out by others, or the
        parameters changed since the last call (the caller then runs it eagerly).
        ``extras``: inputs whose shape follows from the batch size (a carried state).

        ``changes`` counts the events that a version counter does not show: optimizer
        steps (fused optimizers update parameters without moving it), parameters
        registered anywhere (a parameter replaced by another) and the config fields a
        capture bakes in (LAMConfig.position_overflow); on a new value the graphs
        go and the parameter list is read again. The addresses and version counters of the
        parameters are checked after the replay is queued, while the GPU works: as the
        first step of a call they cost 0.16 ms of host time on the H200's host, 3% of a
        forward of 32,768 tokens. A replay that read changed parameters (or the weights a
        layer stacked from their old values) is thrown away, and the graphs with it.
        ``tensors_read()``, called after a capture, lists what the graph reads besides
        its buffers (parameters, tensors derived from them): each graph holds them, so
        a replay never reads memory that was freed, whatever changed since.
        """
        if changes != self.changes:
            self.changes = changes
            self.parameters = list(model.parameters())
            self.fingerprint = None
            self.clear()
        batch, length = input_ids.shape
        bucket = bucket_length(length, chunk_size)
        if batch * bucket > MAX_SHAPE_TOKENS:
            return None
        key = (batch, bucket, input_ids.device, torch.is_inference_mode_enabled(),
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        graphed = self.graphs.get(key)
        if graphed is None:
            if key in self.evicted:
                return None
            if key not in self.seen:
                if len(self.seen) >= MAX_SEEN:
                    self.seen.clear()
                self.seen.add(key)
                return None
            if self._parameters_changed():
                self.graphs.clear()  # captured from other values; this capture reads the current ones
                self.evicted.clear()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            logger.debug("capturing a CUDA graph of the LAM forward for batch %d, length %d", batch, key[1])
            graphed = GraphedForward(forward, batch, key[1], input_ids.device, self.pool, extras)
            graphed.held = tensors_read() if tensors_read is not None else [p.detach() for p in self.parameters]
            self.graphs[key] = graphed
            while len(self.graphs) > MAX_GRAPHS or self.tokens() > MAX_GRAPH_TOKENS:
                self.evicted.add(self.graphs.popitem(last=False)[0])
        self.graphs.move_to_end(key)
        result = graphed(input_ids, attention_mask, token_type_ids, *extras)
        if self._parameters_changed():
            self.clear()
            return None
        return result


_side_stream_lists: dict = {}


def _side_streams(device: torch.device, count: int) -> list:
    """``count`` side streams of layers_on_streams on this device, made once."""
    streams = _side_stream_lists.setdefault(device, [])
    while len(streams) < count:
        streams.append(torch.cuda.Stream(device))
    return streams[:count]


def layers_on_streams(layers, x: torch.Tensor, mask: torch.Tensor, parts: int, backend) -> torch.Tensor:
    """``layers`` applied to ``parts`` parts of the batch, each on its own CUDA stream (see
    LAMConfig.graph_streams). Each layer is queued for every part before the next layer, so
    that the parts keep pace when run eagerly."""
    main = torch.cuda.current_stream(x.device)
    streams = [main] + _side_streams(x.device, parts - 1)
    for stream in streams[1:]:
        stream.wait_stream(main)  # the embeddings are written on main
    xs, masks = list(x.tensor_split(parts)), mask.tensor_split(parts)
    for layer in layers:
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                xs[i] = layer(xs[i], masks[i], backend)
    for stream, part in zip(streams[1:], xs[1:]):
        main.wait_stream(stream)
        # Allocated on a side stream and read on main: the allocator must not hand
        # this memory to the side stream again before main is done with it.
        part.record_stream(main)
    return torch.cat(xs)
