"""STS-B loading (lam_embed.data) and evaluation (evaluation.stsb)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from lam_embed.data import default_data_dir, load_stsb, read_text_lines


def _local_stsb_dir() -> Path | None:
    env = os.environ.get("LAM_STSB")
    if env and os.path.isdir(env):
        return Path(env)
    data_dir = default_data_dir()
    if data_dir is not None and (data_dir / "stsb" / "sts-test.csv").is_file():
        return data_dir / "stsb"
    return None


STSB_DIR = _local_stsb_dir()
needs_stsb = pytest.mark.skipif(
    STSB_DIR is None,
    reason="STS-B csv files not found: set LAM_STSB or LAM_DATA_DIR",
)


def _write_stsb(folder: Path, lines: list[str], name: str = "sts-dev.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def _line(score, s1, s2, extra=()):
    return "\t".join(["main-captions", "MSRvid", "2012test", "0001", str(score), s1, s2, *extra])


# --- loading the real files -------------------------------------------------------------


@needs_stsb
@pytest.mark.parametrize("split, n", [("train", 5749), ("validation", 1500), ("test", 1379)])
def test_local_split_sizes_and_scores(split, n):
    ds = load_stsb(split, STSB_DIR)
    assert len(ds) == n
    assert ds.column_names == ["sentence1", "sentence2", "score"]
    scores = np.array(list(ds["score"]))
    assert scores.min() == 0.0 and scores.max() == 1.0
    assert all(s.strip() for s in [*ds["sentence1"], *ds["sentence2"]])


@needs_stsb
def test_columns_are_read_by_position_even_with_trailing_notes():
    ds = load_stsb("test", STSB_DIR)
    assert ds[0] == {"sentence1": "A girl is styling her hair.", "sentence2": "A girl is brushing her hair.", "score": 0.5}
    # This line carries two trailing source-note columns that must not leak into the sentences.
    banyan = [r for r in ds if r["sentence1"].startswith("I remained under the banyan tree")]
    assert len(banyan) == 1
    assert banyan[0]["sentence2"].endswith("herding the cats every two hours.")
    assert banyan[0]["score"] == pytest.approx(0.6)


@needs_stsb
def test_dev_is_an_alias_of_validation():
    assert load_stsb("dev", STSB_DIR).to_dict() == load_stsb("validation", STSB_DIR).to_dict()


# --- parsing and errors, on small files -------------------------------------------------


def test_scores_are_divided_by_five_and_quotes_are_kept(tmp_path):
    folder = _write_stsb(tmp_path, [_line("5.000", '"Yes," he said.', "He said yes."), _line("0", "a", "b", ["note"])])
    ds = load_stsb("dev", folder)
    assert list(ds["score"]) == [1.0, 0.0]
    assert list(ds["sentence1"]) == ['"Yes," he said.', "a"]


def test_bad_split_names_the_argument_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"split='dev2'.*train, validation, test"):
        load_stsb("dev2", tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        load_stsb("test", tmp_path / "absent")


def test_folder_without_the_csv_file(tmp_path):
    _write_stsb(tmp_path, [_line(1, "a", "b")], name="sts-dev.csv")
    with pytest.raises(FileNotFoundError, match="sts-test.csv"):
        load_stsb("test", tmp_path)


def test_short_line_reports_file_and_line(tmp_path):
    folder = _write_stsb(tmp_path, [_line(1, "a", "b"), "main-captions\tMSRvid\t2012test\t0002\t3.0\tonly one"])
    with pytest.raises(ValueError, match=r"sts-dev\.csv, line 2: expected at least 7"):
        load_stsb("validation", folder)


def test_score_outside_range(tmp_path):
    folder = _write_stsb(tmp_path, [_line(5.5, "a", "b")])
    with pytest.raises(ValueError, match=r"line 1: score 5.5 is outside 0..5"):
        load_stsb("dev", folder)


def test_env_var_chooses_the_default_source(tmp_path, monkeypatch):
    folder = _write_stsb(tmp_path / "stsb", [_line(2.5, "x", "y")], name="sts-test.csv")
    monkeypatch.setenv("LAM_STSB", str(folder))
    assert load_stsb("test").to_dict() == {"sentence1": ["x"], "sentence2": ["y"], "score": [0.5]}
    monkeypatch.delenv("LAM_STSB")
    monkeypatch.setenv("LAM_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert list(load_stsb("test")["sentence1"]) == ["x"]


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_read_text_lines(tmp_path, suffix):
    path = tmp_path / f"lines{suffix}"
    text = "  first \n\n second\n   \nthird\nfourth\n"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    assert read_text_lines(path) == ["first", "second", "third", "fourth"]
    assert read_text_lines(path, limit=2) == ["first", "second"]
    assert read_text_lines(path, limit=0) == []


# --- evaluation with the teacher ----------------------------------------------------------


@pytest.fixture(scope="module")
def teacher():
    from sentence_transformers import SentenceTransformer

    from lam_embed.teacher import resolve_teacher_path

    # Offline, resolve_teacher_path returns the packaged copy without trying the hub.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:
            path = resolve_teacher_path()
        except RuntimeError as err:
            pytest.skip(f"teacher not available: {err}")
    return SentenceTransformer(path, device="cpu")


@needs_stsb
def test_teacher_reference_figure_on_test(teacher):
    from lam_embed.evaluation.stsb import evaluate_stsb

    results = evaluate_stsb(teacher, source=STSB_DIR, splits=("test",))
    assert set(results) == {"test"}
    # Reference: all-MiniLM-L6-v2, cosine, sts-test.csv (see ../shared/data/README.md).
    assert results["test"]["spearman"] == pytest.approx(0.8203, abs=1e-3)
    assert 0.80 < results["test"]["pearson"] < 0.86


@needs_stsb
def test_evaluator_agrees_with_scipy(teacher, tmp_path):
    from lam_embed.evaluation.stsb import evaluate_stsb

    # A 150-pair slice keeps the cost low; the figures must match a direct computation.
    lines = (STSB_DIR / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:150]
    folder = _write_stsb(tmp_path, lines)
    ds = load_stsb("dev", folder)
    results = evaluate_stsb(teacher, source=folder, splits=("dev",))
    assert set(results) == {"validation"}
    e1 = teacher.encode(list(ds["sentence1"]), normalize_embeddings=True)
    e2 = teacher.encode(list(ds["sentence2"]), normalize_embeddings=True)
    cos = (e1 * e2).sum(axis=1)
    gold = list(ds["score"])
    assert results["validation"]["spearman"] == pytest.approx(spearmanr(gold, cos)[0], abs=1e-5)
    assert results["validation"]["pearson"] == pytest.approx(pearsonr(gold, cos)[0], abs=1e-5)
    # The two correlations differ on real data, so a swap of the two would be caught.
    assert abs(results["validation"]["spearman"] - results["validation"]["pearson"]) > 1e-3


def test_cli_writes_table_and_json(teacher, tmp_path, capsys, monkeypatch):
    from lam_embed.evaluation.stsb import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [
        _line(5, "A man is playing a guitar.", "A man plays the guitar."),
        _line(0.2, "A man is playing a guitar.", "A woman is slicing an onion."),
        _line(3.0, "A dog runs in the park.", "A dog is running on grass."),
        _line(1.0, "The cat sleeps.", "A child is reading a book."),
    ]
    folder = _write_stsb(tmp_path / "stsb", rows, name="sts-dev.csv")
    _write_stsb(folder, rows, name="sts-test.csv")
    out = tmp_path / "out" / "stsb.json"
    assert main(["--teacher", "--stsb", str(folder), "--device", "cpu", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "dev Spearman" in table and "test Pearson" in table and "teacher" in table
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["stsb_source"] == str(folder)
    assert {"torch", "transformers", "sentence_transformers"} <= set(report["versions"])
    (row,) = report["models"]
    assert row["is_teacher"] and Path(row["path"]).is_dir()
    assert set(row["results"]) == {"validation", "test"}
    # Both files hold the same pairs, so both splits must give the same figures.
    assert row["results"]["test"] == pytest.approx(row["results"]["validation"])
    assert -1.0 <= row["results"]["test"]["spearman"] <= 1.0


def test_cli_requires_a_model():
    from lam_embed.evaluation.stsb import main

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
