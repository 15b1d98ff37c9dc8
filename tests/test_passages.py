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


def test_sentence_queries_take_the_middle_query_length_sentence_out():
    long_a, long_b = "one two three four five six seven eight.", "nine ten eleven twelve thirteen fourteen fifteen sixteen."
    passage = f"{long_a} Short one. {long_b} Tail."
    queries, documents = passages.sentence_queries([passage, "Only two. Sentences here.", "No. Long. Ones."])
    # candidates are sentences 0 and 2: the middle of the two is index 1 of them, sentence 2
    assert queries == [long_b] and documents == [f"{long_a} Short one. Tail."]


class _FixedEncoder:
    """An encoder that returns given unit vectors for given texts."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode(self, texts, **kwargs):
        import numpy as np

        return np.stack([self.vectors[t] for t in texts])


def test_sentence_retrieval_against_a_direct_count():
    """Three queries: the first finds its document; the second and the third tie their own
    document with another (a tie counts against it), so each ranks it second."""
    import numpy as np

    e = np.eye(3, dtype=np.float32)
    tied = (e[1] + e[2]) / np.sqrt(2)
    vectors = {"q0": e[0], "q1": e[1], "q2": tied, "d0": e[0], "d1": tied, "d2": tied}
    figures = passages.sentence_retrieval(_FixedEncoder(vectors), ["q0", "q1", "q2"], ["d0", "d1", "d2"])
    assert figures["queries"] == 3
    assert figures["acc@1"] == pytest.approx(1 / 3)
    # nDCG@10 with one relevant document is 1 / log2(1 + rank): q0's rank is 1; for q1, d1 and
    # d2 tie at 0.707, so its document ranks second; for q2, d1 and d2 tie at 1: second too.
    assert figures["ndcg@10"] == pytest.approx((1 + 2 / np.log2(3)) / 3)


def test_cli_scores_retrieval_for_the_model_and_the_teacher(tmp_path):
    """The teacher against itself: the two retrieval figures are equal; a file with no
    query-length sentence is refused before any model loads."""
    try:
        teacher = str(resolve_teacher_path())
    except RuntimeError as err:
        pytest.skip(f"teacher not available: {err}")
    path = tmp_path / "p.txt"
    topics = ["river bank", "mountain pass", "city market", "winter storm"]
    path.write_text("\n".join(f"About the {t}. The {t} was described at length by the travellers who came. "
                              f"Nothing else. The {t} was the subject of many songs in the old days." for t in topics) + "\n")
    result = passages.main([teacher, "--teacher", teacher, "--passages", str(path), "--holdout", "4",
                            "--device", "cpu", "--retrieval"])
    retrieval = result["sentence_retrieval"]
    assert retrieval["model"] == retrieval["teacher"] and retrieval["model"]["queries"] == 4
    empty = tmp_path / "short.txt"
    empty.write_text("One. Two. Three.\n")
    with pytest.raises(SystemExit):
        passages.main(["/nonexistent-model", "--passages", str(empty), "--holdout", "1", "--retrieval"])
