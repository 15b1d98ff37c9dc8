"""Carried states and streaming (lam_embed/state.py, lam_embed/streaming.py): a document cut
anywhere into pieces gives the one-pass result, at every level (the delta rule, the model,
the user API), a saved state continues as the unsaved one, and bad input is named."""

import random

import numpy as np
import pytest
import torch
from conftest import one_pass_embedding
from test_delta_rule import flux_module, op_inputs

import lam_embed
from lam_embed import LAMConfig, LAMModel
from lam_embed.ops import dual_state_delta_rule

CHUNK = 16


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_delta_rule_continues_from_carried_states(impl):
    """The states after the first chunks, given as the initial states of the rest, give the
    one-pass output (two samples of other lengths; cut at chunk boundaries)."""
    tensors, mask = op_inputs([150, 97])
    tensors = [t.detach() for t in tensors]
    flux = flux_module()
    with torch.no_grad():
        ref = dual_state_delta_rule(*tensors, mask, flux, impl=impl, chunk_size=CHUNK)
        for cut_chunks in (1, 3, 6):
            cut = cut_chunks * CHUNK
            first, states = dual_state_delta_rule(*[t[:, :, :cut] for t in tensors], mask[:, :cut], flux, impl=impl,
                                                  chunk_size=CHUNK, state_after_chunks=torch.tensor([cut_chunks] * 2))
            rest = dual_state_delta_rule(*[t[:, :, cut:] for t in tensors], mask[:, cut:], flux, impl=impl,
                                         chunk_size=CHUNK, initial_state=states)
            out = torch.cat([first, rest], 2)
            assert ((out - ref).abs() * mask[:, None, :, None]).max() <= 1e-6, (impl, cut)


def test_state_after_chunks_picks_each_samples_own_chunk():
    tensors, mask = op_inputs([100, 40])
    flux = flux_module()
    with torch.no_grad():
        _, (fast, _) = dual_state_delta_rule(*tensors, mask, flux, impl="chunk", chunk_size=CHUNK,
                                             state_after_chunks=torch.tensor([2, 1]))
        for sample, chunks in ((0, 2), (1, 1)):
            n = chunks * CHUNK
            _, (alone, _) = dual_state_delta_rule(*[t[sample:sample + 1, :, :n] for t in tensors],
                                                  mask[sample:sample + 1, :n], flux, impl="chunk", chunk_size=CHUNK,
                                                  state_after_chunks=torch.tensor([chunks]))
            torch.testing.assert_close(fast[sample], alone[0], rtol=0, atol=1e-6)


def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    return torch.device("cuda")


@pytest.mark.gpu
def test_triton_carries_states_as_chunk():
    """On CUDA the fused kernels take carried states: from given initial states (inputs of
    several chunks, of one chunk, of one token) the output and the states after each
    sample's own chunk (0 included: the initial ones) equal the chunked form's (fp32)."""
    gpu = cuda_device()
    flux = flux_module().to(gpu)
    with torch.no_grad():
        tensors, mask = op_inputs([300, 97, 40])
        tensors = [t.detach().to(gpu) for t in tensors]
        _, initial = dual_state_delta_rule(*tensors, mask.to(gpu), flux, impl="chunk", chunk_size=CHUNK,
                                           state_after_chunks=torch.tensor([5, 2, 1], device=gpu))
        for lengths in ([300, 97, 40], [16, 9, 1], [1, 1, 1]):
            tensors, mask = op_inputs(lengths, seed=len(lengths) + lengths[0])
            tensors, mask = [t.detach().to(gpu) for t in tensors], mask.to(gpu)
            after = torch.tensor([n // CHUNK for n in lengths[:-1]] + [0], device=gpu)
            results = {impl: dual_state_delta_rule(*tensors, mask, flux, impl=impl, chunk_size=CHUNK,
                                                   initial_state=initial, state_after_chunks=after)
                       for impl in ("chunk", "triton")}
            (ref, ref_states), (out, states) = results["chunk"], results["triton"]
            assert ((out - ref).abs() * mask[:, None, :, None]).max() <= 1e-5, lengths
            for got, want in zip(states, ref_states):
                assert (got - want).abs().max() <= 1e-5, lengths
            torch.testing.assert_close(states[0][-1], initial[0][-1], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_model_cut_anywhere_equals_one_pass_on_gpu(dtype, bound, monkeypatch):
    """The GPU path: pieces read through the Triton kernels with the carried states equal
    one pass through the fused model (fp32 within 1e-4, bf16 within 2e-2 of the output scale)."""
    from lam_embed import backends

    gpu = cuda_device()
    model = small_model().to(gpu, dtype)
    chosen = []
    select = backends.carried_backend
    monkeypatch.setattr("lam_embed.modeling_lam.carried_backend", lambda *a: chosen.append(select(*a)) or chosen[-1])
    rng = random.Random(2)
    for length in [1, CHUNK, CHUNK + 1, 300, 2000]:
        ids = torch.randint(1, 1000, (1, length), generator=torch.Generator().manual_seed(length)).to(gpu)
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state.float()
            pieces = rng.randint(1, min(20, length))
            cuts = sorted(rng.sample(range(1, length), pieces - 1)) if pieces > 1 else []
            got = stream(model, ids, cuts).float()
        assert (got - ref).abs().max() <= bound * ref.abs().max(), (length, cuts)
    assert {b.delta_impl for b in chosen} == {"triton"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_carried_pieces_replayed_from_cuda_graphs_equal_one_pass(dtype, bound):
    """The same pieces read three times (eager, captured, replayed: a piece shape is captured
    the second time it is seen) give the one-pass output every time, and the graphs of the
    carried forwards were used; state_after_tokens through a graph too."""
    gpu = cuda_device()
    model = small_model().to(gpu, dtype)
    ids = torch.randint(1, 1000, (1, 700), generator=torch.Generator().manual_seed(7)).to(gpu)
    cuts = [5, 100, 130, 400, 416]
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state.float()
        for _ in range(3):
            got = stream(model, ids, cuts).float()
            assert (got - ref).abs().max() <= bound * ref.abs().max()
        assert model._carried_graphs.graphs, "no carried forward was replayed from a graph"
        eager_state = None
        for _ in range(3):
            out = model(input_ids=ids[:, :300], state_after_tokens=torch.tensor([290], device=gpu))
            assert (out.last_hidden_state.float() - ref[:, :300]).abs().max() <= bound * ref.abs().max()
            assert out.state.offset.tolist() == [290 // CHUNK * CHUNK]
            eager_state = eager_state or out.state
            torch.testing.assert_close(out.state.layers[1].slow, eager_state.layers[1].slow, rtol=0, atol=1e-5)


def small_model(seed=0, **fields) -> LAMModel:
    torch.manual_seed(seed)
    config = LAMConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                       chunk_size=CHUNK, vocab_size=1000, **fields)
    model = LAMModel(config).eval()
    with torch.no_grad():  # every parameter non-trivial, as after training
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def stream(model, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """The last hidden state of ``ids`` (1, L) read piece by piece, cut at ``cuts``."""
    state, pending, outputs, start, last = None, ids[:, :0], [], 0, None
    for cut in [*cuts, ids.shape[1]]:
        piece = torch.cat([pending, ids[:, start:cut]], 1)
        start = cut
        out = model(input_ids=piece, past_state=state, use_cache=True)
        before = 0 if state is None else int(state.offset[0])
        done = int(out.state.offset[0]) - before
        outputs.append(out.last_hidden_state[:, :done])
        pending, last, state = piece[:, done:], out.last_hidden_state[:, done:], out.state
    return torch.cat([*outputs, last], 1)


@pytest.mark.parametrize("delta_impl", ["chunk", "naive"])
def test_model_cut_anywhere_equals_one_pass(delta_impl):
    """Documents of 1 to 300 tokens cut at random points into 1-20 pieces: the same last
    hidden state as one pass, at every position (fp32)."""
    model = small_model(delta_impl=delta_impl)
    rng = random.Random(1)
    lengths = [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK] + [rng.randint(1, 300) for _ in range(6 if delta_impl == "chunk" else 1)]
    for length in lengths:
        ids = torch.randint(1, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state
            pieces = rng.randint(1, min(20, length))
            cuts = sorted(rng.sample(range(1, length), pieces - 1)) if pieces > 1 else []
            got = stream(model, ids, cuts)
        assert (got - ref).abs().max() <= 1e-5, (length, cuts)


def test_model_state_of_a_batch_continues_each_document():
    """Two documents of other lengths in one batch (right-padded), continued together."""
    model = small_model()
    a, b = torch.randint(1, 1000, (1, 70)), torch.randint(1, 1000, (1, 45))
    with torch.no_grad():
        refs = [model(input_ids=x).last_hidden_state for x in (a, b)]
        ids = torch.zeros(2, 40, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[0], mask[0] = a[0, :40], 1
        ids[1, :35], mask[1, :35] = b[0, :35], 1
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert first.state.offset.tolist() == [32, 32]
        rest = [a[0, 32:], b[0, 32:]]
        ids2 = torch.zeros(2, 38, dtype=torch.long)
        mask2 = torch.zeros_like(ids2)
        for row, r in enumerate(rest):
            ids2[row, : len(r)], mask2[row, : len(r)] = r, 1
        second = model(input_ids=ids2, attention_mask=mask2, past_state=first.state)
    for row, (ref, n) in enumerate(zip(refs, (70, 45))):
        got = torch.cat([first.last_hidden_state[row, :32], second.last_hidden_state[row, : n - 32]])
        assert (got - ref[0]).abs().max() <= 1e-5


def test_a_state_that_does_not_fit_is_named():
    model = small_model()
    ids = torch.randint(1, 1000, (1, 40))
    with torch.no_grad():
        state = model(input_ids=ids, use_cache=True).state
        with pytest.raises(ValueError, match="past_state holds 1 documents, input_ids 2"):
            model(input_ids=ids.repeat(2, 1), past_state=state)
        other = small_model(conv_size=3)
        with pytest.raises(ValueError, match="past_state layer 0: shapes"):
            other(input_ids=ids, past_state=state)
        state.offset = state.offset + 1
        with pytest.raises(ValueError, match="multiple of chunk_size 16"):
            model(input_ids=ids, past_state=state)


def test_state_after_tokens_carries_past_the_first_tokens_only():
    """state_after_tokens=n: the output is the one-pass output of all the ids, and the state
    the one a forward of the first n ids would carry (n anywhere, 0 included)."""
    model = small_model()
    ids = torch.randint(1, 1000, (2, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        for n in (0, 15, 16, 33, 50):
            out = model(input_ids=ids, state_after_tokens=torch.tensor([n, n]))
            torch.testing.assert_close(out.last_hidden_state, ref, rtol=0, atol=1e-5)
            want = model(input_ids=ids[:, :n], use_cache=True).state if n else None
            assert out.state.offset.tolist() == [n // CHUNK * CHUNK] * 2
            for layer, want_layer in zip(out.state.layers, want.layers if want else [None] * len(out.state.layers)):
                if want_layer is not None:
                    torch.testing.assert_close(layer.fast, want_layer.fast, rtol=0, atol=1e-6)
                    torch.testing.assert_close(layer.conv_tail, want_layer.conv_tail, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="state_after_tokens must hold one count per sample in 0..its valid"):
            model(input_ids=ids, state_after_tokens=torch.tensor([51, 3]))


# ------------------------------------------------------------------------- the user API


@pytest.fixture(scope="module", params=[None, 2], ids=["no-cap", "repeat-cap-2"])
def st_model(request):
    """A small LAM sentence-transformer (mean pooling, Normalize) with chunks of 16 tokens,
    without and with a token repeat cap (TEXT repeats each of its words 12 times or more)."""
    from conftest import small_lam_sentence_transformer

    model, _ = small_lam_sentence_transformer(delta_net_noise=0.05, chunk_size=CHUNK,
                                              token_repeat_cap=request.param)
    model.max_seq_length = 100_000
    return model.eval()


TEXT = ("The river bank was steep and the water ran fast. A heron stood in the reeds, waiting. "
        "Far away a bell rang twice, and the boats turned home before the storm. ") * 12


def test_encode_document_equals_encode(st_model):
    want = st_model.encode(TEXT)
    for segment in (CHUNK, 64, 10_000):
        got = lam_embed.encode_document(st_model, TEXT, segment_tokens=segment)
        assert np.abs(got - want).max() <= 1e-5, segment


def test_pieces_appended_equal_one_pass_of_their_ids(st_model):
    words = TEXT.split()
    rng = random.Random(0)
    for count in (1, 2, 7, 20):
        cuts = sorted(rng.sample(range(1, len(words)), count - 1))
        pieces = [" ".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, len(words)])]
        document = lam_embed.start_document(st_model, segment_tokens=32)
        for piece in pieces:
            document.append(piece)
        assert document.tokens == len(one_pass_ids(st_model, pieces)) - 1  # [SEP] comes with embedding
        assert np.abs(document.embedding - one_pass_embedding(st_model, pieces)).max() <= 1e-5, count


def one_pass_ids(model, pieces):
    tok = model.tokenizer
    return [tok.cls_token_id] + [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]] + [
        tok.sep_token_id]


def test_embedding_read_between_appends_equals_one_pass_of_each_prefix(st_model):
    """Reading the embedding carries the state past the pending ids; the appends after it
    continue from there (pieces of 1 to ~60 tokens, a segment of two chunks)."""
    words = TEXT.split()
    rng = random.Random(5)
    cuts = sorted(rng.sample(range(1, len(words)), 11))
    pieces = [" ".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, len(words)])]
    document = lam_embed.start_document(st_model, segment_tokens=2 * CHUNK)
    for number, piece in enumerate(pieces, 1):
        document.append(piece)
        if number % 3 != 2:  # some appends are not followed by a read
            assert np.abs(document.embedding - one_pass_embedding(st_model, pieces[:number])).max() <= 1e-5, number
    assert document.tokens == len(one_pass_ids(st_model, pieces)) - 1


def test_saved_state_continues_as_the_unsaved_one(st_model, tmp_path):
    document = lam_embed.start_document(st_model, segment_tokens=32).append(TEXT)
    document.save(tmp_path / "doc.state")
    loaded = lam_embed.DocumentState.load(tmp_path / "doc.state", st_model)
    assert np.array_equal(loaded.embedding, document.embedding)
    for d in (document, loaded):
        d.append("And then the rain came.")
    assert np.array_equal(loaded.embedding, document.embedding)
    assert np.abs(document.embedding - one_pass_embedding(st_model, [TEXT, "And then the rain came."])).max() <= 1e-5


def test_state_saved_in_the_single_sum_format_continues(st_model, tmp_path):
    """A state saved before the per-id sums (one sum and its count) loads for a model without
    a repeat cap and continues as the unsaved one; with a cap it is a clear error."""
    from safetensors.torch import save_file

    from lam_embed import streaming

    document = lam_embed.start_document(st_model, segment_tokens=32).append(TEXT)
    pooled = document.pooled
    tensors = {k: v.contiguous() for k, v in document.state.to_dict().items()}
    tensors["sum"] = pooled.sums.sum(0)
    metadata = {"format": streaming.FORMAT_SINGLE_SUM, "model": streaming.model_fingerprint(document.lam),
                "pending": __import__("json").dumps(document.pending), "count": str(pooled.tokens),
                "segment_tokens": str(document.segment_tokens)}
    metadata["checksum"] = streaming._checksum(tensors, metadata)
    save_file(tensors, str(tmp_path / "old.state"), metadata=metadata)
    if st_model[0].auto_model.config.token_repeat_cap is not None:
        with pytest.raises(ValueError, match="holds one sum, not the per-id sums a token repeat cap needs"):
            lam_embed.DocumentState.load(tmp_path / "old.state", st_model)
        return
    loaded = lam_embed.DocumentState.load(tmp_path / "old.state", st_model)
    for d in (document, loaded):
        d.append("And then the rain came.")
    assert np.abs(loaded.embedding - document.embedding).max() <= 1e-6


def test_encode_documents_batches_documents_of_other_lengths(st_model):
    documents = [TEXT, "A short one.", [TEXT[:300], TEXT[300:700]]]
    got = lam_embed.encode_documents(st_model, documents, batch_size=2, segment_tokens=32)
    want = [one_pass_embedding(st_model, [TEXT]), one_pass_embedding(st_model, ["A short one."]), one_pass_embedding(st_model, [TEXT[:300], TEXT[300:700]])]
    assert np.abs(got - np.stack(want)).max() <= 1e-5


def test_bad_input_is_named(st_model, tmp_path):
    document = lam_embed.start_document(st_model)
    with pytest.raises(ValueError, match="empty"):
        document.append("   ")
    with pytest.raises(TypeError, match="must be a str, got int"):
        document.append(5)
    with pytest.raises(TypeError, match="document 1: a document piece must be a str"):
        lam_embed.encode_documents(st_model, ["fine", [b"bytes"]])
    with pytest.raises(ValueError, match="segment_tokens must be an integer of at least the chunk size 16"):
        lam_embed.start_document(st_model, segment_tokens=8)
    document.append(TEXT)
    document.embedding  # encodes the text: the saved file then holds the state's tensors
    path = tmp_path / "doc.state"
    document.save(path)
    other = lam_embed.build_sentence_transformer(lam_embed.from_teacher(num_hidden_layers=2, chunk_size=CHUNK))
    with pytest.raises(ValueError, match="saved with another model or config"):
        lam_embed.DocumentState.load(path, other)
    damaged = tmp_path / "damaged.state"
    damaged.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is not a saved LAM document state"):
        lam_embed.DocumentState.load(damaged, st_model)
    flipped = bytearray(path.read_bytes())
    flipped[-5] ^= 0xFF  # a byte of the last tensor
    (tmp_path / "flipped.state").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        lam_embed.DocumentState.load(tmp_path / "flipped.state", st_model)
    with pytest.raises(ValueError, match="must be a LAM SentenceTransformer"):
        lam_embed.start_document(__import__("sentence_transformers").SentenceTransformer(lam_embed.resolve_teacher_path()))
