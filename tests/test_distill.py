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


def test_distill_smoke_and_exact_resume(tmp_path, one_torch_thread):
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


def test_ema_is_saved_and_resumes_exactly(tmp_path, one_torch_thread):
    """With --ema-decay the saved weights are the moving average (not the last weights),
    and a run interrupted in stage 2 resumes its average exactly."""
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


def _command(out: Path, *extra: str) -> list[str]:
    return ["scripts/distill.py", "--output-dir", str(out), "--max-sentences", "200", "--max-passages", "20",
            "--batch-size", "4", "--passage-batch-size", "2", "--passage-every", "2", "--max-dev-pairs", "8",
            "--eval-every", "0", "--save-every", "100", "--log-every", "1", "--device", "cpu", *extra]


def _run_processes(out: Path, processes: int, *extra: str) -> tuple[list[dict], dict]:
    """scripts/distill.py in ``processes`` processes (torchrun, gloo), one thread each: the
    per-step records of its summary and the saved weights."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*launcher, *_command(out, *extra)], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = [r for r in summary["history"] if "loss" in r]
    weights = load_file(out / "model" / "model.safetensors") if summary["finished"] else {}
    return steps, weights


def _same_steps(a: list[dict], b: list[dict]) -> None:
    """The same losses and gradient norms, step by step: to float rounding at the first
    step, and within 1e-4 once the weights have taken AdamW's rounding-sized differences."""
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 0
    for n, (x, y) in enumerate(zip(a, b)):
        for key in ("loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=2e-6 if n == 0 else 1e-4, abs=2e-6), (x, y)


def test_two_processes_follow_one_process(tmp_path):
    """torchrun with two CPU processes (gloo): each takes half of every batch (sentences and
    passages), its losses are shares of the whole batch's and the gradients are summed, so
    every step of both stages (the similarity term over the whole batch included) has the
    loss and gradient norm of one process on the whole batch. The weights agree to the
    order of the learning rate times a few 1e-3: AdamW's first steps divide each gradient
    component by its own size, so a component near zero whose sign float rounding flips (two
    half-batch sums against one) moves the other way. A two-process checkpoint resumes in
    one process on the same path."""
    options = ("--stage1-steps", "2", "--stage2-steps", "3", "--similarity-weight", "1.0")
    one, one_weights = _run_processes(tmp_path / "one", 1, *options)
    two, two_weights = _run_processes(tmp_path / "two", 2, *options)
    assert len(one) == 5
    _same_steps(one, two)
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        assert (one_weights[name] - two_weights[name]).abs().max() <= 1e-3, name
    _run_processes(tmp_path / "mixed", 2, *options, "--stop-after-minutes", "0.00001")
    resumed, _ = _run_processes(tmp_path / "mixed", 1, *options, "--resume")
    _same_steps(one, resumed)


def test_shares_of_a_batch_add_up_to_its_gradient(one_torch_thread):
    """The losses of two shares of a batch, as two processes compute them (the similarity
    term with the other share's rows as constants), have gradients that sum to the whole
    batch's loss's, in both stages."""
    import lam_embed
    from transformers import AutoTokenizer

    from lam_embed.training.distributed import Processes

    torch.manual_seed(0)
    path = lam_embed.resolve_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = distill.Teacher(path, torch.device("cpu"))
    student = lam_embed.from_teacher(path, delta_impl="chunk")
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    texts = ["A man is playing a guitar on stage.", "Dogs run.", "Stocks fell sharply on Monday after the report.", "Hi"]
    batch = dict(tokenizer(texts, padding=True, pad_to_multiple_of=16, return_tensors="pt"))
    shares = [slice(0, 2), slice(2, 4)]
    tokens = batch["attention_mask"].sum()

    def gradient(loss):
        student.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    def part(rows):
        return {k: v[rows] for k, v in batch.items()}

    with torch.no_grad():
        student_rows = [distill.mean_pool(student(**part(s)).last_hidden_state, part(s)["attention_mask"]) for s in shares]
        teacher_rows = [teacher(part(s))[2] for s in shares]

    class Share(Processes):  # what gather_rows gives in process ``rank`` of two
        def gather_rows(self, local):
            rows = student_rows if local.requires_grad else teacher_rows
            return torch.cat([local if i == self.rank else rows[i] for i in range(self.world)])

    def stage_loss(stage, features, processes=Processes(), count=None):
        hidden, attention, embedding = teacher(features)
        if stage == 1:
            return distill.stage1_loss(student, hidden, attention, features["attention_mask"].bool(), count)
        return distill.stage2_loss(student, features, hidden, embedding, 0.1, 1.0, processes, count)[0]

    student.train()
    for stage in (1, 2):
        whole = gradient(stage_loss(stage, batch))
        summed = None
        for rank, rows in enumerate(shares):
            g = gradient(stage_loss(stage, part(rows), Share(rank, 2), tokens))
            summed = g if summed is None else {k: summed[k] + g[k] for k in summed}
        assert summed.keys() == whole.keys()
        for name in whole:
            assert (summed[name] - whole[name]).abs().max() <= 1e-5 * whole[name].abs().max() + 1e-12, (stage, name)


def test_batches_must_divide_among_the_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        run(tmp_path)
    assert "--batch-size 4 does not divide among the 3 processes" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one_within_1e_6(tmp_path):
    """At learning rates 1/400 of the recipe's, two processes give the weights of one process
    on the whole batch within 1e-6 after both stages, while the weights move by more than ten
    times that. The exception is AdamW's sign flips: where a gradient is near zero, the
    order of the processes' sum can flip the sign of its normalised step, moving that weight
    by up to a step's size (one element in 23.7M on an AVX-512 machine); at most one
    element in a million may take one."""
    options = ("--stage1-steps", "2", "--stage2-steps", "3", "--similarity-weight", "1.0",
               "--lr-stage1", "5e-6", "--lr-stage2", "1.25e-6")
    import lam_embed

    _, one = _run_processes(tmp_path / "one", 1, *options)
    _, two = _run_processes(tmp_path / "two", 2, *options)
    torch.manual_seed(42)  # the script's default seed: its initial student
    start = lam_embed.from_teacher(lam_embed.resolve_teacher_path()).state_dict()
    differences = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
    flipped = int((differences > 1e-6).sum())
    print(f"moved {moved:.2e}, largest difference {differences.max():.2e}, {flipped} over 1e-6")
    assert moved > 1e-5
    assert flipped <= differences.numel() // 1_000_000, flipped
    assert differences.max() <= moved
