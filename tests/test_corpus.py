"""Corpus encoding (lam_embed/corpus.py): row i is line i, an interrupted run resumes without
duplicate or missing rows, the multi-process pool gives the single process's embeddings in
input order, and bad input is named."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lam_embed import corpus

ROOT = Path(__file__).resolve().parent.parent
LINES = [f"line {i}: the {'quick ' * (i % 7)}brown fox number {i}" for i in range(23)] + ["", "last line"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import small_lam_sentence_transformer

    st, _ = small_lam_sentence_transformer(delta_net_noise=0.05, chunk_size=16)
    folder = tmp_path_factory.mktemp("model") / "lam"
    st.save(str(folder))
    return st.eval(), folder


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_rows_are_lines_and_equal_plain_encode(model, corpus_file, tmp_path):
    st, _ = model
    corpus.encode_corpus(st, corpus_file, tmp_path / "out", shard_size=10, batch_size=4, show_progress_bar=False)
    got = corpus.read_embeddings(tmp_path / "out")
    want = st.encode(LINES, batch_size=4, normalize_embeddings=True)
    assert got.shape == (len(LINES), want.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "embeddings-00000.npy", "embeddings-00001.npy", "embeddings-00002.npy", "manifest.json"]


def test_interrupted_run_resumes_without_duplicate_or_missing_rows(model, corpus_file, tmp_path, monkeypatch):
    st, _ = model
    calls = []
    encode_texts = corpus.encode_texts

    def interrupted(texts, **kwargs):
        calls.append(texts[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a user's Ctrl-C between two shards
        return encode_texts(st, texts, **kwargs)

    monkeypatch.setattr(corpus, "encode_texts", lambda model, texts, **kw: interrupted(texts, **kw))
    with pytest.raises(KeyboardInterrupt):
        corpus.encode_corpus(st, corpus_file, tmp_path / "out", shard_size=10, show_progress_bar=False)
    with pytest.raises(FileNotFoundError, match="is incomplete: missing .*embeddings-00001.npy"):
        corpus.read_embeddings(tmp_path / "out")
    # A shard cut short on disk (not written by encode_corpus, which renames whole files) is redone too.
    np.save(tmp_path / "out" / "embeddings-00002.npy", np.zeros((3, 384), dtype=np.float32))
    resumed_calls = []
    monkeypatch.setattr(corpus, "encode_texts",
                        lambda model, texts, **kw: resumed_calls.append(texts[0]) or encode_texts(model, texts, **kw))
    corpus.encode_corpus(st, corpus_file, tmp_path / "out", shard_size=10, show_progress_bar=False)
    assert resumed_calls == [LINES[10], LINES[20]]  # shard 0 was kept
    got = corpus.read_embeddings(tmp_path / "out")
    np.testing.assert_allclose(got, st.encode(LINES, normalize_embeddings=True), rtol=0, atol=1e-6)
    assert not list((tmp_path / "out").glob("*.partial*"))


def test_other_settings_in_the_same_folder_are_an_error(model, corpus_file, tmp_path):
    st, _ = model
    corpus.encode_corpus(st, corpus_file, tmp_path / "out", shard_size=10, show_progress_bar=False)
    with pytest.raises(ValueError, match=r"other settings \(shard_size: \[10\] there, \[5\] now\)"):
        corpus.encode_corpus(st, corpus_file, tmp_path / "out", shard_size=5, show_progress_bar=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        corpus.encode_corpus(st, corpus_file, tmp_path / "x", dtype="int8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad.txt: not UTF-8 text \(line 2"):
        corpus.encode_corpus(st, bad, tmp_path / "y")


def test_two_cpu_processes_give_the_single_process_embeddings_in_order(model, corpus_file, tmp_path):
    """sentence-transformers' multi-process pool over a LAM model (each process loads it with
    lam_embed) returns the single-process embeddings, row for row."""
    st, _ = model
    corpus.encode_corpus(st, corpus_file, tmp_path / "pool", shard_size=100, batch_size=4, devices=["cpu", "cpu"],
                         show_progress_bar=False)
    got = corpus.read_embeddings(tmp_path / "pool")
    np.testing.assert_allclose(got, st.encode(LINES, batch_size=4, normalize_embeddings=True), rtol=0, atol=1e-6)


def test_cli_names_bad_options_and_writes_the_rows(model, corpus_file, tmp_path):
    _, folder = model

    def run(*args):
        return subprocess.run([sys.executable, "scripts/encode_corpus.py", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    done = run(str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "o"))
    assert done.returncode == 2 and "missing.txt does not exist" in done.stderr
    done = run(str(corpus_file), "--output-dir", str(tmp_path / "o"), "--shard-size", "0")
    assert done.returncode == 2 and "--shard-size: expected a positive integer, got 0" in done.stderr
    done = run(str(corpus_file), "--output-dir", str(tmp_path / "o"), "--model", str(folder), "--device", "cpu",
               "--shard-size", "8")
    assert done.returncode == 0, done.stderr
    assert corpus.read_embeddings(tmp_path / "o").shape == (len(LINES), 384)
