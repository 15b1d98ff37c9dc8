"""training/finetune.py: a CPU smoke run (loss falls, the saved model reloads) and input checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lam_embed.data import load_stsb
from lam_embed.teacher import resolve_teacher_path
from lam_embed.training import finetune
from lam_embed.training.finetune import FinetuneError, PairFileError, load_pair_file


def _tiny_lam_path(tmp: Path) -> str:
    """A 2-layer LAM initialised from the teacher, saved as a sentence-transformers folder."""
    import lam_embed

    model = lam_embed.build_sentence_transformer(lam_embed.from_teacher(num_hidden_layers=2), max_seq_length=64)
    model.save(str(tmp / "tiny-lam"))
    return str(tmp / "tiny-lam")


# Models the smoke run fine-tunes: name -> function(tmp folder) returning a model folder.
# A tiny LAM (the acceptance case) and the teacher (any sentence-transformers model works).
MODEL_PATHS = {
    "minilm": lambda tmp: resolve_teacher_path(),
    "tiny-lam": _tiny_lam_path,
}

N_TRAIN, N_EVAL = 24, 40
SMOKE_STEPS, EVAL_STEPS = 6, 3
PROBES = ["A man is playing a guitar.", "Two dogs run across a snowy field.", "The stock market fell sharply today."]


def _stsb_line(score01: float, s1: str, s2: str) -> str:
    # The original STS-B csv layout that lam_embed.data.load_stsb reads: score 0..5 in column 5.
    return "\t".join(["main-captions", "MSRvid", "2012test", "0001", f"{5 * score01:.3f}", s1, s2])


@pytest.fixture(scope="module")
def stsb_small(tmp_path_factory) -> Path:
    """A folder of small sts-{train,dev,test}.csv files cut from the real STS-B (local or hub)."""
    folder = tmp_path_factory.mktemp("stsb")
    names = {"train": "sts-train.csv", "validation": "sts-dev.csv", "test": "sts-test.csv"}
    for split, name in names.items():
        try:
            ds = load_stsb(split)
        except (OSError, RuntimeError, ValueError) as err:  # no local copy and no hub: nothing to cut from
            pytest.skip(f"STS-B is not available ({type(err).__name__}: {err})")
        rows = ds.select(range(N_EVAL))
        lines = [_stsb_line(r["score"], r["sentence1"], r["sentence2"]) for r in rows]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def train_tsv(tmp_path_factory) -> Path:
    """A few dozen STS-B train pairs as a user file: header, tab-separated, raw 0..5 scores."""
    try:
        ds = load_stsb("train").select(range(N_TRAIN))
    except (OSError, RuntimeError, ValueError) as err:
        pytest.skip(f"STS-B is not available ({type(err).__name__}: {err})")
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    lines = ["sentence1\tsentence2\tscore"] + [f"{r['sentence1']}\t{r['sentence2']}\t{5 * r['score']:.3f}" for r in ds]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=sorted(MODEL_PATHS))
def model_path(request, tmp_path_factory) -> str:
    return MODEL_PATHS[request.param](tmp_path_factory.mktemp(request.param))


def _run(argv: list[str]):
    from conftest import torch_on_one_thread

    # One thread: on a shared 2-core machine two oversubscribed threads ran ~3x slower than one.
    with torch_on_one_thread():
        return finetune.run(finetune.parse_args(argv))


def _common(model_path, stsb_small, out: Path) -> list[str]:
    return [
        "--model", str(model_path), "--stsb", str(stsb_small), "--output-dir", str(out),
        "--eval-steps", str(EVAL_STEPS), "--logging-steps", "1", "--max-seq-length", "32",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(model_path, stsb_small, train_tsv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    # The whole file is one batch, so every step sees the same pairs and the loss trend is not
    # hidden by batch-to-batch noise; a larger learning rate makes a few steps enough.
    argv = _common(model_path, stsb_small, out) + [
        "--train", str(train_tsv), "--score-range", "0", "5",
        "--max-steps", str(SMOKE_STEPS), "--batch-size", str(N_TRAIN), "--lr", "1e-4",
    ]  # fmt: skip
    model, report = _run(argv)
    return SimpleNamespace(out=out, model=model, report=report, model_path=model_path)


def test_smoke_loss_falls(smoke):
    state = json.loads((smoke.out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == SMOKE_STEPS
    assert np.mean(losses[-2:]) < 0.95 * losses[0], losses
    assert state["global_step"] == SMOKE_STEPS


def test_smoke_saved_model_reloads_and_encodes_identically(smoke):
    from sentence_transformers import SentenceTransformer

    final = smoke.out / "final"
    reloaded = SentenceTransformer(str(final), device="cpu")
    assert reloaded.max_seq_length == 32
    expected = smoke.model.encode(PROBES, convert_to_numpy=True)
    got = reloaded.encode(PROBES, convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Fine-tuning changed the weights: the saved model is not the starting one.
    start = SentenceTransformer(str(smoke.model_path), device="cpu")
    start.max_seq_length = 32
    assert np.abs(start.encode(PROBES, convert_to_numpy=True) - got).max() > 1e-4


def test_smoke_results_checkpoints_and_model_card(smoke):
    report = json.loads((smoke.out / finetune.RESULTS_FILE).read_text())
    provenance = report.pop("provenance")  # what made the file: lam_embed.environment.write_result
    assert provenance["command"].startswith("python ") and provenance["commit"] and provenance["device"]
    assert report == json.loads(json.dumps(smoke.report))
    assert report["loss"] == "cosent" and report["train_data"]["layout"] == "scored pairs"
    assert report["train_data"]["rows"] == N_TRAIN and report["seed"] == 42
    for split in ("validation", "test"):
        for metric in ("spearman", "pearson"):
            assert -1.0 <= report["stsb"][split][metric] <= 1.0
    assert report["train_seconds"] > 0 and report["global_step"] == SMOKE_STEPS
    # The kept model is the best dev checkpoint, and its dev figure is what the final evaluation finds.
    assert Path(report["best_checkpoint"]).parent == smoke.out
    assert report["stsb"]["validation"]["spearman"] == pytest.approx(
        report["best_dev_spearman_during_training"], abs=1e-6
    )
    assert len(list(smoke.out.glob("checkpoint-*"))) <= 2
    card = (smoke.out / "final" / "README.md").read_text(encoding="utf-8")
    assert "CoSENTLoss" in card and "sentence-transformers" in card  # the trainer's record of the run
    lam = json.loads((Path(smoke.model_path) / "config.json").read_text()).get("model_type") == "lam"
    assert ("# LAM (fine-tuned): a linear-time sentence encoder" in card) == lam
    if lam:  # LAM's own card: its fine-tuned figures, how to load it, the command that made it
        stsb = report["stsb"]
        assert (f"| LAM (fine-tuned) | {100 * stsb['validation']['spearman']:.2f} | "
                f"{100 * stsb['test']['spearman']:.2f} |") in card
        assert "import lam_embed" in card and "`python scripts/finetune.py " in card
        assert card.index("## Fine-tuning run (sentence-transformers' record)") > card.index("## License")


def test_existing_checkpoints_need_resume(smoke, model_path, stsb_small, train_tsv, monkeypatch):
    monkeypatch.setattr(finetune, "_load_model", _must_not_load)
    argv = _common(model_path, stsb_small, smoke.out) + ["--train", str(train_tsv), "--score-range", "0", "5"]
    with pytest.raises(FinetuneError, match="already holds checkpoints.*--resume"):
        finetune.run(finetune.parse_args(argv))


def test_resume_continues_from_last_checkpoint(smoke, model_path, stsb_small, train_tsv, tmp_path):
    out = tmp_path / "out"
    last = smoke.out / f"checkpoint-{SMOKE_STEPS}"
    shutil.copytree(last, out / last.name)
    argv = _common(model_path, stsb_small, out) + [
        "--train", str(train_tsv), "--score-range", "0", "5",
        "--max-steps", str(SMOKE_STEPS + 2), "--batch-size", str(N_TRAIN), "--lr", "1e-4", "--resume",
    ]  # fmt: skip
    _, report = _run(argv)
    assert Path(report["resumed_from"]).name == last.name
    assert report["global_step"] == SMOKE_STEPS + 2
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    # The history from the copied checkpoint continues; no step is trained twice.
    assert steps == list(range(1, SMOKE_STEPS + 3))


def test_triplets_train_with_mnrl(model_path, stsb_small, tmp_path):
    rows = [
        {"anchor": f"A person is cooking dish number {i}.", "positive": f"Someone prepares meal {i}.",
         "negative": f"The train {i} leaves the station."}
        for i in range(8)
    ]  # fmt: skip
    path = tmp_path / "triplets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = _common(model_path, stsb_small, tmp_path / "out") + [
        "--train",
        str(path),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
    ]
    _, report = _run(argv)
    assert report["loss"] == "mnrl" and report["train_data"]["layout"] == "triplets"
    assert report["batch_size"] == 4 and report["global_step"] == 2
    assert (tmp_path / "out" / "final" / "README.md").is_file()


# --- reading training files -----------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_scored_tsv_is_rescaled_and_keeps_quotes(tmp_path):
    path = _write(
        tmp_path,
        "s.tsv",
        'sentence1\tsentence2\tscore\tgenre\nHe said "hi.\tA "quote\t5\tnews\n\nA b\tC d\t1.25\tnews\n',
    )
    ds = load_pair_file(path, score_range=(0, 5))
    assert ds.column_names == ["sentence1", "sentence2", "score"]
    assert ds["sentence1"] == ['He said "hi.', "A b"] and ds["sentence2"] == ['A "quote', "C d"]
    assert ds["score"] == pytest.approx([1.0, 0.25])


def test_pairs_csv_and_triplets_jsonl(tmp_path):
    csv_path = _write(tmp_path, "p.csv", 'anchor,positive\n"Hello, world",Hi world\nq,"a ""quoted"" answer"\n')
    ds = load_pair_file(csv_path)
    assert ds.column_names == ["anchor", "positive"]
    assert ds["anchor"] == ["Hello, world", "q"] and ds["positive"] == ["Hi world", 'a "quoted" answer']
    jl = _write(
        tmp_path,
        "t.jsonl",
        '{"sentence1": "a", "sentence2": "b", "negative": "c"}\n\n{"sentence1": "d", "sentence2": "e", "negative": "f"}\n',
    )
    ds = load_pair_file(jl)
    assert ds.column_names == ["anchor", "positive", "negative"] and ds["negative"] == ["c", "f"]
    scored = load_pair_file(_write(tmp_path, "s.jsonl", '{"anchor": "a", "positive": "b", "label": 0.5}\n'))
    assert scored["score"] == [0.5]


@pytest.mark.parametrize(
    "name, text, score_range, pattern",
    [
        (
            "missing.tsv",
            "sentence1\tscore\na\t1\n",
            (0, 5),
            r"missing\.tsv, line 1 \(header\): found columns \['sentence1', 'score'\]; expected .*'sentence2'",
        ),
        (
            "missing.jsonl",
            '{"anchor": "a", "positive": "b"}\n{"anchor": "c"}\n',
            (0, 1),
            r"missing\.jsonl, line 2: missing the column 'positive'",
        ),
        (
            "range.tsv",
            "sentence1\tsentence2\tscore\na\tb\t4\nc\td\t7\n",
            (0, 5),
            r"range\.tsv, line 3: score 7 is outside the declared range 0\.\.5",
        ),
        (
            "range.csv",
            "sentence1,sentence2,score\na,b,3.5\n",
            (0, 1),
            r"range\.csv, line 2: score 3\.5 is outside the declared range 0\.\.1 \(set the range with --score-range",
        ),
        ("empty.tsv", "", (0, 1), r"empty\.tsv: the file is empty; expected a header line"),
        ("empty.jsonl", "\n\n", (0, 1), r"empty\.jsonl: the file is empty"),
        (
            "header.csv",
            "sentence1,sentence2,score\n",
            (0, 1),
            r"header\.csv: the file has a header \(line 1\) but no data rows",
        ),
        ("text.tsv", "anchor\tpositive\na\t  \n", (0, 1), r"text\.tsv, line 2: column 'positive' is empty"),
        (
            "nan.tsv",
            "sentence1\tsentence2\tscore\na\tb\thigh\n",
            (0, 5),
            r"nan\.tsv, line 2: column 'score' must be a number, found 'high'",
        ),
        (
            "fields.tsv",
            "anchor\tpositive\na\tb\tc\n",
            (0, 1),
            r"fields\.tsv, line 2: found 3 tab-separated fields, expected 2",
        ),
        (
            "json.jsonl",
            '{"anchor": "a", "positive": "b"}\n{"anchor": "a",\n',
            (0, 1),
            r"json\.jsonl, line 2: not valid JSON",
        ),
        (
            "both.tsv",
            "anchor\tpositive\tnegative\tscore\na\tb\tc\t1\n",
            (0, 1),
            r"both\.tsv, line 1 \(header\): has both 'score' and 'negative'",
        ),
        ("pairs.txt", "a b\n", (0, 1), r"pairs\.txt: unknown file type '\.txt'"),
    ],
)
def test_bad_files_name_file_line_and_expectation(tmp_path, name, text, score_range, pattern):
    path = _write(tmp_path, name, text)
    with pytest.raises(PairFileError, match=pattern):
        load_pair_file(path, score_range=score_range)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("anchor\tpositive\nok\tfine\ncaf\u00e9\tbar\n".encode("latin-1"))
    with pytest.raises(PairFileError, match=r"latin1\.tsv, line 3: not UTF-8 text"):
        load_pair_file(path)


def _must_not_load(name):
    raise AssertionError("the model was loaded although the input is bad")


@pytest.mark.parametrize(
    "text, extra, error, pattern",
    [
        (
            "sentence1\tsentence2\tscore\na\tb\t9\n",
            ["--score-range", "0", "5"],
            PairFileError,
            r"line 2: score 9 is outside",
        ),
        ("sentence1\tscore\nb\t1\n", [], PairFileError, r"line 1 \(header\): found columns"),
        ("", [], PairFileError, r"the file is empty"),
        (
            "sentence1\tsentence2\tscore\na\tb\t0.5\n",
            ["--loss", "mnrl"],
            FinetuneError,
            r"--loss mnrl needs positive pairs",
        ),
        ("anchor\tpositive\na\tb\n", ["--loss", "angle"], FinetuneError, r"--loss angle needs scored pairs"),
    ],
)
def test_bad_input_stops_before_the_model_is_loaded(tmp_path, monkeypatch, text, extra, error, pattern):
    monkeypatch.setattr(finetune, "_load_model", _must_not_load)
    path = _write(tmp_path, "train.tsv", text)
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern):
        finetune.run(finetune.parse_args(["--train", str(path), "--output-dir", str(out), *extra]))
    assert not out.exists()


def test_main_reports_bad_file_with_exit_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "_load_model", _must_not_load)
    path = _write(tmp_path, "bad.jsonl", '{"anchor": "a", "positive": ""}\n')
    assert finetune.main(["--train", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 1: column 'positive' is empty" in err and "Traceback" not in err


def test_missing_default_model_folder_is_a_clear_error(tmp_path, monkeypatch, stsb_small, train_tsv):
    monkeypatch.chdir(tmp_path)
    argv = ["--stsb", str(stsb_small), "--train", str(train_tsv), "--score-range", "0", "5", "--output-dir", "out"]
    with pytest.raises(FinetuneError, match="model folder 'lam' does not exist"):
        finetune.run(finetune.parse_args(argv))


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--train", "--stsb", "--loss", "--score-range", "--output-dir", "--epochs", "--batch-size",
                   "--lr", "--warmup-ratio", "--seed", "--max-steps", "--eval-steps", "--bf16", "--resume",
                   "--max-train-samples", "--max-seq-length", "--freeze-token-mixer"):  # fmt: skip
        assert option in text


def test_freeze_token_mixer_trains_everything_else(model_path, stsb_small, train_tsv, tmp_path):
    """--freeze-token-mixer: after training, the token mixer (LAM's DeltaNet, BERT's
    self-attention and its output projection) is unchanged and the FFNs have moved."""
    from sentence_transformers import SentenceTransformer

    before = {n: p.detach().clone() for n, p in SentenceTransformer(model_path, device="cpu").named_parameters()}
    argv = _common(model_path, stsb_small, tmp_path / "out") + [
        "--train", str(train_tsv), "--score-range", "0", "5", "--max-steps", "2", "--batch-size", str(N_TRAIN),
        "--lr", "1e-3", "--freeze-token-mixer",
    ]  # fmt: skip
    model, _ = _run(argv)
    after = dict(model.named_parameters())
    mixer = [n for n in before if any(part in f".{n}" for part in finetune.TOKEN_MIXER_NAMES)]
    ffn = [n for n in before if ("ffn_in" in n or "intermediate.dense" in n) and n.endswith("weight")]
    assert mixer and ffn
    assert all(torch.equal(before[n], after[n].detach().cpu()) for n in mixer)
    assert all(not torch.equal(before[n], after[n].detach().cpu()) for n in ffn)


def test_freeze_token_mixer_needs_a_token_mixer():
    with pytest.raises(FinetuneError, match="no token-mixer parameters"):
        finetune.freeze_token_mixer(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def _finetune_processes(model: str, stsb: Path, train: Path, out: Path, processes: int, loss: str):
    """scripts/finetune.py in ``processes`` processes (torchrun, gloo), one thread each, on a
    global batch of 8: the saved model's weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    argv = ["scripts/finetune.py", "--model", model, "--stsb", str(stsb), "--train", str(train), "--output-dir", str(out),
            "--score-range", "0", "5", "--max-steps", "3", "--eval-steps", "3", "--batch-size", "8", "--lr", "2e-5",
            "--max-seq-length", "32", "--loss", loss]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*launcher, *argv], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "final" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cosent", "angle"])
def test_two_processes_train_as_one_on_the_global_batch(stsb_small, train_tsv, tmp_path, loss):
    """torchrun with two CPU processes: each embeds half of every batch of 8, the scored-pair
    loss is taken over the gathered batch, and the weights after three steps equal those of
    one process on the whole batch (dropout off, so that the random masks cannot differ). A
    small learning rate: AdamW's first steps turn gradient rounding into weight differences
    of the order of the learning rate times the rounding."""
    import lam_embed

    torch.manual_seed(0)  # the same DeltaNet initialisation whichever tests ran before
    lam = lam_embed.from_teacher(num_hidden_layers=2, hidden_dropout_prob=0.0)
    model = lam_embed.build_sentence_transformer(lam, max_seq_length=64)
    model.save(str(tmp_path / "tiny"))
    one = _finetune_processes(str(tmp_path / "tiny"), stsb_small, train_tsv, tmp_path / "one", 1, loss)
    two = _finetune_processes(str(tmp_path / "tiny"), stsb_small, train_tsv, tmp_path / "two", 2, loss)
    start = model[0].auto_model.state_dict()
    assert one.keys() == two.keys()
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
    assert moved > 1e-5  # the runs trained
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{loss}: moved {moved:.2e}, largest difference {worst:.2e}")
    assert worst < 1e-6, worst


def test_batch_size_must_divide_among_the_processes(stsb_small, train_tsv, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(FinetuneError, match="--batch-size 8 does not divide among 3 processes"):
        finetune.run(finetune.parse_args(["--model", "x", "--stsb", str(stsb_small), "--train", str(train_tsv),
                                          "--score-range", "0", "5", "--batch-size", "8",
                                          "--output-dir", str(tmp_path / "o")]))
