"""evaluation/passages.py: the held-out split and the agreement figures of its CLI."""

import json

import pytest

from lam_embed.evaluation import passages
from lam_embed.teacher import resolve_teacher_path


def test_held_out_passages_are_the_last_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"passage {i}" for i in range(10)) + "\n")
    assert passages.held_out_passages(path, 3) == ["passage 7", "passage 8", "passage 9"]


def test_cli_compares_a_model_with_the_teacher_given(tmp_path):
    """The teacher against itself (the model, and --teacher through a link of its own, so that
    the JSON shows which one was read): cosine 1 for every passage, and the truncation length
    reaches the figures."""
    try:
        teacher = tmp_path / "teacher"
        teacher.symlink_to(resolve_teacher_path(), target_is_directory=True)
    except RuntimeError as err:
        pytest.skip(f"teacher not available: {err}")
    teacher = str(teacher)
    path = tmp_path / "p.txt"
    text = [" ".join(["The river bank was steep and the water ran fast."] * n) for n in (1, 12, 30, 2)]
    path.write_text("\n".join(text) + "\n")
    out = tmp_path / "agreement.json"
    result = passages.main([teacher, "--teacher", teacher, "--passages", str(path), "--holdout", "3",
                            "--max-seq-length", "64", "--device", "cpu", "--output", str(out)])
    written = json.loads(out.read_text())
    assert written.pop("provenance")["device"]  # what made the file: lam_embed.environment.write_result
    assert written == result
    assert result["passages"] == 3 and result["teacher"] == teacher
    assert result["max_tokens"] == 64 and result["min_tokens"] < 64  # the 2-sentence passage is short
    assert result["min_cosine"] == pytest.approx(1.0, abs=1e-5)
