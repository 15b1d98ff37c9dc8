"""CPU smoke run of the distillation: both stages, release files, and an interrupted run
that resumes to exactly the weights of an uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lam_embed.data import default_data_dir
from lam_embed.training import distill

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(DATA is None or not (DATA / "corpus").is_dir(), reason="shared data folder not found")


def run(out: Path, *extra: str) -> dict:
    return distill.main([
        "--output-dir", str(out), "--max-sentences", "200", "--max-passages", "20",
        "--stage1-steps", "3", "--stage2-steps", "3", "--batch-size", "4", "--passage-batch-size", "2",
        "--passage-every", "3", "--max-dev-pairs", "24", "--eval-every", "3", "--save-every", "100",
        "--device", "cpu", *extra,
    ])


def test_distill_smoke_and_exact_resume(tmp_path):
    torch.set_num_threads(1)  # deterministic kernels, so the two runs can be compared exactly
    whole = run(tmp_path / "whole")
    assert whole["finished"] and whole["step"] == 6
    assert all(k in whole for k in ("stsb_dev_spearman", "train_minutes", "commit"))
    release = tmp_path / "whole" / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["command"].startswith("python scripts/distill.py") and manifest["data"]["sentences"] == 200
    weights = load_file(release / "lam_weights.safetensors")
    assert "layers.0.delta_net.q_proj.weight" in weights  # trained, so shipped
    assert "embeddings.word_embeddings.weight" not in weights  # the teacher's, so not shipped
    assert all(t.dtype == torch.float16 for t in weights.values())

    # Interrupted after the first step (time budget), then resumed.
    first = run(tmp_path / "parts", "--stop-after-minutes", "0.00001")
    assert not first["finished"] and first["step"] == 1
    assert not (tmp_path / "parts" / "release").exists()
    second = run(tmp_path / "parts", "--resume")
    assert second["finished"] and second["step"] == 6
    resumed = load_file(tmp_path / "parts" / "release" / "lam_weights.safetensors")
    assert resumed.keys() == weights.keys()
    for name in weights:
        assert torch.equal(resumed[name], weights[name]), name


def test_distill_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        run(tmp_path, "--resume")
    with pytest.raises(SystemExit):
        run(tmp_path, "--stage1-steps", "0", "--stage2-steps", "0")


def test_ema_is_saved_and_resumes_exactly(tmp_path):
    """With --ema-decay the saved weights are the moving average (not the last weights),
    and a run interrupted in stage 2 resumes its average exactly."""
    torch.set_num_threads(1)
    options = ("--stage1-steps", "0", "--stage2-steps", "4", "--ema-decay", "0.5")
    last = run(tmp_path / "last", "--stage1-steps", "0", "--stage2-steps", "4")
    whole = run(tmp_path / "whole", *options)
    assert whole["finished"]
    assert "stsb_dev_spearman_last_weights" in whole["history"][-1]
    # Same seed and batches: the last weights of the EMA run are those of the plain run, and
    # the plain run's figure is the EMA run's "last weights" figure.
    assert whole["history"][-1]["stsb_dev_spearman_last_weights"] == last["stsb_dev_spearman"]
    averaged = load_file(tmp_path / "whole" / "release" / "lam_weights.safetensors")
    plain = load_file(tmp_path / "last" / "release" / "lam_weights.safetensors")
    assert any(not torch.equal(averaged[n], plain[n]) for n in plain)

    first = run(tmp_path / "parts", *options, "--stop-after-minutes", "0.00001")
    assert not first["finished"] and first["step"] == 1
    second = run(tmp_path / "parts", *options, "--resume")
    assert second["finished"]
    resumed = load_file(tmp_path / "parts" / "release" / "lam_weights.safetensors")
    for name in averaged:
        assert torch.equal(resumed[name], averaged[name]), name

    # Resuming without the moving average the checkpoint holds is an error, not a silent restart of it.
    run(tmp_path / "mixed", *options, "--stop-after-minutes", "0.00001")
    with pytest.raises(SystemExit, match="same --ema-decay"):
        run(tmp_path / "mixed", "--stage1-steps", "0", "--stage2-steps", "4", "--resume")


def test_ema_decay_must_be_a_fraction(tmp_path):
    with pytest.raises(SystemExit, match="--ema-decay must be in"):
        run(tmp_path, "--ema-decay", "1.0")


def test_stsb_train_sentences_are_mixed_into_sentence_batches():
    """--stsb-train-fraction: that share of every sentence batch comes from the extra pool,
    passage batches are untouched, and the stream is the same for the same seed."""
    sentences = [f"s{i}" for i in range(100)]
    passages = [f"p{i}" for i in range(10)]
    extra = [f"x{i}" for i in range(12)]

    def make(fraction):
        return distill.Batches(sentences, passages, None, 8, 2, 3, 16, 32, 7, extra, fraction)

    mixed, again, plain = make(0.25), make(0.25), make(0.0)
    seen = set()
    for step in range(30):
        texts, max_length = mixed.texts(step)
        assert (texts, max_length) == again.texts(step)
        if step % 3 == 2:  # passage batch
            assert max_length == 32 and texts == plain.texts(step)[0] and all(t[0] == "p" for t in texts)
            continue
        assert max_length == 16 and len(texts) == 8
        assert [t[0] for t in texts] == ["s"] * 6 + ["x"] * 2
        seen.update(t for t in texts if t[0] == "x")
    assert seen == set(extra)  # 20 sentence batches x 2 = 40 draws cycle through all 12


def test_stsb_train_fraction_must_be_a_fraction(tmp_path):
    with pytest.raises(SystemExit, match="--stsb-train-fraction must be in"):
        run(tmp_path, "--stsb-train-fraction", "1.5")


def test_stsb_train_sentences_reach_the_manifest(tmp_path):
    run(tmp_path, "--stage1-steps", "0", "--stage2-steps", "1", "--stsb-train-fraction", "0.5")
    data = json.loads((tmp_path / "release" / "manifest.json").read_text())["data"]
    assert data["stsb_train_fraction"] == 0.5 and data["stsb_train_sentences"] > 10_000


def test_passage_crop_takes_runs_of_consecutive_words():
    """--passage-crop: each passage of a passage batch becomes a run of consecutive words of
    the passage it replaces, at least that fraction long; sentence batches are untouched,
    the same step gives the same crops, and the crops vary across passes over the data."""
    sentences = [f"s{i}" for i in range(100)]
    passages = [" ".join(f"p{i}w{j}" for j in range(40)) for i in range(6)]

    def make(crop):
        return distill.Batches(sentences, passages, None, 8, 2, 3, 16, 32, 7, [], 0.0, crop)

    cropped, again, whole = make(0.3), make(0.3), make(0.0)
    lengths = set()
    for step in range(60):
        texts, max_length = cropped.texts(step)
        assert (texts, max_length) == again.texts(step)
        full = whole.texts(step)[0]
        if step % 3 != 2:
            assert texts == full
            continue
        for part, passage in zip(texts, full, strict=True):
            words = part.split()
            assert len(words) >= 12 and f" {part} " in f" {passage} "
            lengths.add(len(words))
    assert len(lengths) > 5


def test_passage_crop_must_be_a_fraction(tmp_path):
    with pytest.raises(SystemExit, match="--passage-crop must be in"):
        run(tmp_path, "--passage-crop", "-0.1")
