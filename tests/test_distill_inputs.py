"""Bad inputs of the distillation: a clear error naming the option and the file, exit
status 2, before the teacher is loaded."""

import pytest

from lam_embed.training import distill


@pytest.fixture
def no_teacher(monkeypatch):
    """Loading the teacher fails the test: every error here must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the inputs were checked")
    monkeypatch.setattr(distill.lam_embed, "resolve_teacher_path", refuse)


def stsb_folder(tmp_path):
    folder = tmp_path / "stsb"
    folder.mkdir()
    line = "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man plays.\tA man is playing.\n"
    for name in ("sts-dev.csv", "sts-train.csv"):
        (folder / name).write_text(line * 3)
    return folder


def run(tmp_path, capsys, sentences, *extra, stsb=None):
    argv = ["--sentences", str(sentences), "--passages", "", "--stsb", str(stsb or stsb_folder(tmp_path)),
            "--output-dir", str(tmp_path / "out"), "--device", "cpu", *extra]
    with pytest.raises(SystemExit) as exit_info:
        distill.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_corpus(tmp_path, capsys, no_teacher):
    missing = tmp_path / "nowhere.txt.gz"
    assert f"--sentences: {missing} does not exist" in run(tmp_path, capsys, missing)


def test_empty_corpus(tmp_path, capsys, no_teacher):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert f"--sentences: {empty} holds no sentence" in run(tmp_path, capsys, empty)


def test_corpus_that_is_not_utf8(tmp_path, capsys, no_teacher):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    assert f"--sentences: {latin}: not UTF-8 text" in run(tmp_path, capsys, latin)


def test_stsb_folder_without_its_files(tmp_path, capsys, no_teacher):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one sentence\n")
    empty = tmp_path / "empty-stsb"
    empty.mkdir()
    err = run(tmp_path, capsys, corpus, stsb=empty)
    assert "--stsb: STS-B file" in err and "sts-dev.csv" in err


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--passage-batch-size", "-2", "--passage-batch-size must be >= 1, got -2"),
    ("--max-sentences", "-1", "--max-sentences must be >= 0, got -1"),
])
def test_bad_numbers(tmp_path, capsys, no_teacher, option, value, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one sentence\n")
    assert message in run(tmp_path, capsys, corpus, option, value)
