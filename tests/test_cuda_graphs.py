"""CUDA graphs of the LAM forward (lam_embed/inference/cuda_graphs.py): the same output as the
eager forward, through shape buckets, weight changes and bad inputs."""

import pytest
import torch

from lam_embed import LAMConfig, LAMModel
from lam_embed.inference.cuda_graphs import LENGTH_STEP, bucket_length


def test_bucket_length():
    assert [bucket_length(n, 128) for n in (1, LENGTH_STEP, LENGTH_STEP + 1)] == [LENGTH_STEP, LENGTH_STEP, 2 * LENGTH_STEP]
    # Never past the chunk: padding there would add a second chunk.
    assert bucket_length(99, 100) == 100 and bucket_length(100, 100) == 100
    # Past the chunk: steps of 1/16 of the power of two at or above the length.
    assert [bucket_length(n, 128) for n in (129, 256, 257, 1000, 8192, 8193)] == [144, 256, 288, 1024, 8192, 9216]
    for n in range(129, 20000):
        b = bucket_length(n, 128)
        assert n <= b <= 1.125 * n + LENGTH_STEP and b % LENGTH_STEP == 0
        assert bucket_length(b, 128) == b  # a bucket is its own bucket: every length in it shares one graph


def test_config_rejects_a_cuda_graphs_value_that_is_not_a_bool():
    with pytest.raises(ValueError, match="cuda_graphs"):
        LAMConfig(cuda_graphs="yes")


def test_no_graphs_on_cpu():
    model = LAMModel(LAMConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                               vocab_size=50)).eval()
    with torch.no_grad():
        assert not model.uses_cuda_graphs(torch.ones(2, 5, dtype=torch.long))


class FakeGraph:
    """Stands in for GraphedForward on CPU: counts captures and replays."""

    captures = 0

    def __init__(self, forward, batch, length, device, pool, extras=()):
        FakeGraph.captures += 1
        self.length, self.replays = length, 0

    def __call__(self, input_ids, attention_mask, token_type_ids, *extras):
        self.replays += 1
        return input_ids.float(), None


@pytest.fixture()
def fake_graphs(monkeypatch):
    """ForwardGraphs with its bookkeeping as on CUDA, but graphs that run nothing."""
    from lam_embed.inference import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "GraphedForward", FakeGraph)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: "pool")
    FakeGraph.captures = 0
    model = torch.nn.Linear(3, 3)
    graphs = cuda_graphs.ForwardGraphs()

    def call(batch, length, changes=(0, 0)):
        ids = torch.zeros(batch, length, dtype=torch.long)
        return graphs(model, None, ids, ids, ids, changes=changes, chunk_size=128)

    return graphs, model, call


def test_a_shape_is_captured_on_its_second_call(fake_graphs):
    graphs, _, call = fake_graphs
    assert call(4, 20) is None  # first sighting: the caller runs it eagerly
    assert call(4, 20) is not None and FakeGraph.captures == 1
    assert call(4, 30) is not None and FakeGraph.captures == 1  # the same bucket
    assert call(4, 33) is None and call(5, 20) is None  # another bucket, another batch size
    assert next(iter(graphs.graphs.values())).replays == 2


def test_graphs_go_when_a_parameter_changes(fake_graphs):
    graphs, model, call = fake_graphs
    call(2, 8), call(2, 8)
    assert len(graphs.graphs) == 1
    with torch.no_grad():
        model.weight.mul_(2.0)  # in place: its version counter moves
    assert call(2, 8) is None and not graphs.graphs
    call(2, 8)
    assert call(2, 8, changes=(1, 0)) is None  # an optimizer step, or a parameter registered
    call(2, 8, changes=(1, 0))
    model.weight = torch.nn.Parameter(torch.ones(3, 3))  # what the counters report; the list is read again
    assert call(2, 8, changes=(1, 1)) is None
    assert call(2, 8, changes=(1, 1)) is not None
    with torch.no_grad():
        model.weight.add_(1.0)  # the new parameter is the one watched now
    assert call(2, 8, changes=(1, 1)) is None


def test_a_stale_replay_is_thrown_away_and_a_graph_holds_what_it_reads(fake_graphs):
    """The addresses and versions of the parameters are checked once the replay is queued:
    a replay that read changed parameters is thrown away, and until then the graph holds
    the storage it reads, so a replaced ``.data`` is never freed under it."""
    graphs, model, call = fake_graphs
    call(2, 8), call(2, 8)
    graph = next(iter(graphs.graphs.values()))
    old = model.weight.data_ptr()
    model.weight.data = torch.ones(3, 3)  # moves no counter: only the address tells
    assert any(t.data_ptr() == old for t in graph.held)
    assert call(2, 8) is None and graph.replays == 2 and not graphs.graphs  # replayed, then thrown away


def test_graphs_hold_the_parameters_and_the_stacked_weights():
    model = LAMModel(LAMConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                               vocab_size=50)).eval()
    with torch.no_grad():  # each layer's stacked weights, kept between calls without gradients
        stacked = [t for layer in model.layers for t in layer.delta_net.stacked_weights()]
    held = model._graph_tensors_read()
    assert len(stacked) == 6 and all(any(t is h for h in held) for t in stacked)
    assert {p.data_ptr() for p in model.parameters()} <= {t.data_ptr() for t in held}


def test_parameters_without_version_counters(fake_graphs):
    """Parameters made under torch.inference_mode have no version counter; the check reads
    their addresses and counts them as version 0."""
    from lam_embed.parameter_changes import version_sum

    graphs, model, call = fake_graphs
    with torch.inference_mode():
        model.weight = torch.nn.Parameter(torch.ones(3, 3))
    assert model.weight.is_inference() and version_sum([model.weight, model.bias]) == model.bias._version
    call(2, 8, changes=(0, 1)), call(2, 8, changes=(0, 1))
    assert call(2, 8, changes=(0, 1)) is not None and FakeGraph.captures == 1


def test_at_most_max_graphs_are_kept_the_oldest_go_first(fake_graphs):
    from lam_embed.inference.cuda_graphs import MAX_GRAPHS

    graphs, _, call = fake_graphs
    for batch in range(1, MAX_GRAPHS + 2):
        call(batch, 8), call(batch, 8)
    assert len(graphs.graphs) == MAX_GRAPHS
    assert min(key[0] for key in graphs.graphs) == 2  # batch 1 was the oldest


def test_kept_graphs_hold_at_most_max_graph_tokens(fake_graphs, monkeypatch):
    from lam_embed.inference import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_GRAPH_TOKENS", 1000)
    monkeypatch.setattr(cuda_graphs, "MAX_SHAPE_TOKENS", 900)
    graphs, _, call = fake_graphs
    for batch in (2, 3, 4):
        call(batch, 200), call(batch, 200)  # 400, 600 and 800 tokens (bucket 208: 416, 624, 832)
    assert [key[0] for key in graphs.graphs] == [4]
    # A shape above the limit on its own runs eagerly every time, and the kept graphs stay.
    assert call(1, 1000) is None and call(1, 1000) is None and call(1, 1000) is None
    assert [key[0] for key in graphs.graphs] == [4] and FakeGraph.captures == 3


def test_a_shape_pushed_out_runs_eagerly_instead_of_being_captured_again(fake_graphs, monkeypatch):
    """Passes over more shapes than the graphs hold: each shape is captured once; those
    pushed out run eagerly on later passes rather than pushing out the others in turn."""
    from lam_embed.inference import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_GRAPH_TOKENS", 1000)
    graphs, _, call = fake_graphs
    shapes = [(2, 200), (3, 200), (4, 200)]  # 416, 624 and 832 tokens: one graph fits at a time
    for _ in range(4):
        results = [call(*shape) for shape in shapes]
    assert FakeGraph.captures == 3  # once each, on the second pass
    assert [r is not None for r in results] == [False, False, True]  # only the one kept replays
    assert [key[0] for key in graphs.graphs] == [4]
    graphs.clear()  # new parameters, say: every shape may be captured again
    call(2, 200), call(2, 200)
    assert FakeGraph.captures == 4


def test_shapes_over_max_shape_tokens_run_eagerly(fake_graphs):
    from lam_embed.inference.cuda_graphs import MAX_GRAPH_TOKENS, MAX_SHAPE_TOKENS

    assert 4 * MAX_SHAPE_TOKENS <= MAX_GRAPH_TOKENS
    graphs, _, call = fake_graphs
    for _ in range(3):
        assert call(MAX_SHAPE_TOKENS // 512 + 1, 512) is None
    assert call(MAX_SHAPE_TOKENS // 512, 512) is None and call(MAX_SHAPE_TOKENS // 512, 512) is not None
    assert FakeGraph.captures == 1


def test_inference_mode_and_autocast_have_graphs_of_their_own(fake_graphs):
    graphs, _, call = fake_graphs
    call(2, 8), call(2, 8)
    with torch.inference_mode():
        assert call(2, 8) is None
    with torch.autocast("cpu"):  # the cuda autocast state is part of the key, the cpu one not
        assert call(2, 8) is not None
    assert FakeGraph.captures == 1


@pytest.fixture()
def gpu_model():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    config = LAMConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                       vocab_size=100, delta_impl="triton")
    model = LAMModel(config).cuda().eval()
    for layer in model.layers:  # non-trivial flux and convolutions, as after training
        torch.nn.init.normal_(layer.delta_net.flux.bilinear, std=0.3)
        torch.nn.init.normal_(layer.delta_net.q_conv.weight, std=0.5)
    return model


def inputs(lengths, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, 100, mask.shape, generator=g) * mask
    return ids.cuda(), mask.cuda()


def eager(model, ids, mask):
    model.config.cuda_graphs = False
    try:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        model.config.cuda_graphs = True


def graphed(model, ids, mask):
    """The forward when its shape has been seen before: a replay of a captured graph."""
    model(input_ids=ids, attention_mask=mask)  # a first sighting runs eagerly (or replays)
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def close(a, b, mask, bound=1e-5):
    return ((a - b) * mask[..., None]).abs().max().item() <= bound * b.abs().max().item()


@pytest.mark.gpu
def test_graph_replay_equals_eager_forward(gpu_model):
    ids, mask = inputs([37, 20, 1], 37)
    with torch.inference_mode():
        ref = eager(gpu_model, ids, mask)
        out = graphed(gpu_model, ids, mask)
        assert len(gpu_model._graphs.graphs) == 1  # the second call was a replay
        assert close(out, ref, mask)
        # Each call returns its own tensor: a later replay leaves it as it was.
        kept = out.clone()
        other_ids, other_mask = inputs([37, 30, 5], 37, seed=1)
        other = gpu_model(input_ids=other_ids, attention_mask=other_mask).last_hidden_state
        assert torch.equal(out, kept)
        assert close(other, eager(gpu_model, other_ids, other_mask), other_mask)


@pytest.mark.gpu
def test_one_graph_serves_every_length_of_its_bucket(gpu_model):
    """A shorter input after a longer one of the same bucket: the padding the longer one
    left in the graph's buffers must not reach the shorter one's tokens."""
    long_len = 2 * LENGTH_STEP
    short_len = LENGTH_STEP + 3
    assert bucket_length(long_len, 128) == bucket_length(short_len, 128)
    with torch.inference_mode():
        ids, mask = inputs([long_len, long_len - 4], long_len)
        graphed(gpu_model, ids, mask)
        ids, mask = inputs([short_len, 7], short_len, seed=2)
        out = gpu_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert len(gpu_model._graphs.graphs) == 1 and out.shape[1] == short_len
        assert close(out, eager(gpu_model, ids, mask), mask)


@pytest.mark.gpu
def test_graph_of_a_multi_chunk_input_equals_eager_forward(gpu_model):
    """Inputs longer than a chunk replay graphs too (their bucket pads the last chunk)."""
    length = 300  # bucket 320: three chunks, the last one partly padding
    assert bucket_length(length, 128) == 320
    with torch.inference_mode():
        ids, mask = inputs([length, 129, 40], length, seed=3)
        out = graphed(gpu_model, ids, mask)
        assert len(gpu_model._graphs.graphs) == 1 and out.shape[1] == length
        assert close(out, eager(gpu_model, ids, mask), mask)


@pytest.mark.gpu
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_batch_parts_on_streams_equal_eager_forward(gpu_model, monkeypatch, streams):
    """A graph runs the layers of config.graph_streams parts of the batch on as many streams: one
    stream, and even or uneven parts (5 inputs in 3 parts: 2, 2, 1) of mixed lengths, give
    the values of the eager forward in the inputs' order."""
    monkeypatch.setattr(gpu_model.config, "graph_streams", streams)
    monkeypatch.setattr(gpu_model.config, "graph_streams_min_tokens", 0)  # this small batch too
    ids, mask = inputs([37, 300, 1, 129, 20], 300, seed=4)
    with torch.inference_mode():
        out = graphed(gpu_model, ids, mask)
        assert len(gpu_model._graphs.graphs) == 1
        assert close(out, eager(gpu_model, ids, mask), mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graphs_follow_weight_changes(gpu_model, dtype):
    """An optimizer step, an in-place update, a replaced parameter and a conversion each
    change what the graphs read: the next call must see the new weights."""
    model = gpu_model.to(dtype)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    ids, mask = inputs([40, 33], 40)
    with torch.no_grad():
        before = graphed(model, ids, mask)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(input_ids=ids, attention_mask=mask).last_hidden_state.float().square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = graphed(model, ids, mask)
        assert (after - before).abs().max() > 1e-2
        assert close(after.float(), eager(model, ids, mask).float(), mask, bound)
        model.layers[1].delta_net.k_proj.weight.mul_(2.0)
        model.layers[0].ffn_out.bias.add_(1.0)
        assert close(graphed(model, ids, mask).float(), eager(model, ids, mask).float(), mask, bound)
        net = model.layers[0].delta_net
        net.v_proj.weight = torch.nn.Parameter(torch.randn_like(net.v_proj.weight) * 0.1)  # a new tensor
        assert close(graphed(model, ids, mask).float(), eager(model, ids, mask).float(), mask, bound)
        model.half()
        out = graphed(model, ids, mask)
        assert out.dtype == torch.float16
        assert close(out.float(), eager(model, ids, mask).float(), mask, 2e-2)


@pytest.mark.gpu
def test_bad_inputs_raise_through_a_graph(gpu_model):
    ids, mask = inputs([20, 15], 20)
    with torch.no_grad():
        good = graphed(gpu_model, ids, mask)
        bad = ids.clone()
        bad[1, 3] = 100
        with pytest.raises(ValueError, match="outside the vocabulary"):
            gpu_model(input_ids=bad, attention_mask=mask)
        with pytest.raises(ValueError, match="right-padded"):
            gpu_model(input_ids=ids, attention_mask=mask.flip(1))
        assert torch.equal(gpu_model(input_ids=ids, attention_mask=mask).last_hidden_state, good)


@pytest.mark.gpu
def test_hidden_states_and_training_run_eagerly(gpu_model):
    ids, mask = inputs([25], 25)
    with torch.no_grad():
        for _ in range(2):
            out = gpu_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
        assert not gpu_model._graphs.graphs
    loss = gpu_model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean()
    loss.backward()  # gradients wanted: the eager path
    assert not gpu_model._graphs.graphs
    with torch.no_grad():
        graphed(gpu_model, ids, mask)
    assert len(gpu_model._graphs.graphs) == 1
    gpu_model.train()  # back to training: the graphs and their memory go
    assert not gpu_model._graphs.graphs
