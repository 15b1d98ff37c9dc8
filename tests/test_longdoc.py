"""evaluation/longdoc.py: metrics against hand-computed values, the generators against their
contract, the embedding paths against sentence-transformers' own encode, and the CLI."""

import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lam_embed.evaluation import longdoc
from lam_embed.evaluation.needles import NEEDLES

# ---------------------------------------------------------------------------------------------
# Metrics


def test_ndcg_with_one_relevant_document():
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    assert longdoc.ndcg_at_k(scores, [frozenset({0})])[0] == pytest.approx(1.0)
    assert longdoc.ndcg_at_k(scores, [frozenset({2})])[0] == pytest.approx(1 / math.log2(4))  # rank 3: 0.5


def test_ndcg_with_several_relevant_documents():
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    # relevant at ranks 1 and 3, ideal at ranks 1 and 2
    expected = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert longdoc.ndcg_at_k(scores, [frozenset({0, 2})])[0] == pytest.approx(expected)
    # more relevant documents than k: the ideal ranking fills the k places
    scores = np.arange(12, 0, -1, dtype=float)[None]
    assert longdoc.ndcg_at_k(scores, [frozenset(range(11))], k=10)[0] == pytest.approx(1.0)


def test_ndcg_is_zero_past_k():
    scores = np.arange(12, 0, -1, dtype=float)[None]  # document 11 ranks 12th
    assert longdoc.ndcg_at_k(scores, [frozenset({11})], k=10)[0] == 0.0
    assert longdoc.ndcg_at_k(scores, [frozenset({9})], k=10)[0] == pytest.approx(1 / math.log2(11))


def test_accuracy_at_1():
    scores = np.array([[0.1, 0.9, 0.3], [0.9, 0.1, 0.3]])
    relevant = [frozenset({1}), frozenset({1})]
    assert longdoc.accuracy_at_1(scores, relevant).tolist() == [1.0, 0.0]


def test_ties_count_against_the_relevant_document():
    scores = np.array([[0.5, 0.5, 0.5, 0.2]])
    assert longdoc.accuracy_at_1(scores, [frozenset({0})])[0] == 0.0
    assert longdoc.ndcg_at_k(scores, [frozenset({0})])[0] == pytest.approx(1 / math.log2(4))  # third of three tied
    # a relevant document strictly ahead of a tie is first
    assert longdoc.accuracy_at_1(np.array([[0.6, 0.5, 0.5]]), [frozenset({0})])[0] == 1.0


def test_task_score_checks_the_shape():
    task = longdoc.RetrievalTask("t", "acc@1", ["a", "b"], ["q"], [frozenset({1})], group="t")
    assert longdoc.task_score(task, np.array([[0.0, 1.0]])) == 1.0
    with pytest.raises(ValueError, match=r"scores of shape \(2, 2\), expected \(1, 2\)"):
        longdoc.task_score(task, np.zeros((2, 2)))


def test_task_rejects_a_relevant_index_outside_the_documents():
    with pytest.raises(ValueError, match="query 0 has no valid relevant document"):
        longdoc.RetrievalTask("t", "acc@1", ["a"], ["q"], [frozenset({3})], group="t")


# ---------------------------------------------------------------------------------------------
# Generators

PASSKEY_LINE = re.compile(r"(\w+ \w+)'s pass key is (\d{5})\. Remember it\. \2 is the pass key for \1\.")


@pytest.mark.parametrize("length", [64, 256, 1024, 4096])
def test_passkey_documents_keep_the_contract(length):
    task = longdoc.passkey_task(length, documents=40, queries=20, seed=3)
    assert len(task.documents) == 40 and len(task.queries) == 20
    names = []
    filler = longdoc.PASSKEY_FILLER.split()
    for text in task.documents:
        assert len(text.split()) == longdoc.word_budget(length) == int(0.75 * length)
        lines = PASSKEY_LINE.findall(text)
        assert len(lines) == 1 and text.count("pass key is") == 1
        names.append(lines[0][0])
        # without its line, the document is the filler from its start, cut at the budget,
        # and the line sits at a sentence boundary
        parts = PASSKEY_LINE.split(text)  # before, name, key, after
        before, after = parts[0], parts[-1]
        rest = (before + " " + after).split()
        assert rest == [filler[i % len(filler)] for i in range(len(rest))]
        assert before == "" or before.rstrip().endswith(".")
    assert len(set(names)) == len(names)
    for query, relevant in zip(task.queries, task.relevant):
        (doc,) = relevant
        name = PASSKEY_LINE.search(task.documents[doc]).group(1)
        assert query == f"What is the pass key for {name}?"


def test_passkey_is_deterministic_per_seed():
    first = longdoc.passkey_task(512, 30, 10, seed=1)
    again = longdoc.passkey_task(512, 30, 10, seed=1)
    other = longdoc.passkey_task(512, 30, 10, seed=2)
    as_bytes = lambda t: json.dumps([t.documents, t.queries, [sorted(r) for r in t.relevant]]).encode()  # noqa: E731
    assert as_bytes(first) == as_bytes(again)
    assert as_bytes(first) != as_bytes(other)


HAYSTACK = " ".join(f"Sentence number {i} talks about topic {i % 7} at some length." for i in range(400))


@pytest.mark.parametrize("length", [64, 512, 8192])
def test_needle_documents_keep_the_contract(length):
    task = longdoc.needle_task(HAYSTACK, length, documents=30, queries=12, seed=5)
    facts = {fact: question for fact, question in NEEDLES}
    words = HAYSTACK.split()
    cycled = " ".join(words * (len(task.documents[0].split()) // len(words) + 2))
    seen = []
    for text in task.documents:
        assert len(text.split()) == longdoc.word_budget(length)
        present = [fact for fact in facts if fact in text]
        assert len(present) == 1 and text.count(present[0]) == 1
        seen.append(present[0])
        before, after = text.split(present[0])
        # without the needle: a stretch of the haystack (wrapping around); the needle at a sentence boundary
        assert " ".join((before + " " + after).split()) in cycled
        assert before == "" or before.rstrip().endswith(".")
    assert len(set(seen)) == len(seen)  # one fact per document, each in one document
    for query, relevant in zip(task.queries, task.relevant):
        (doc,) = relevant
        assert facts[seen[doc]] == query


def test_needle_is_deterministic_per_seed():
    first = longdoc.needle_task(HAYSTACK, 256, 20, 5, seed=0)
    assert first.documents == longdoc.needle_task(HAYSTACK, 256, 20, 5, seed=0).documents
    assert first.documents != longdoc.needle_task(HAYSTACK, 256, 20, 5, seed=1).documents


def test_needles_are_distinct_and_enough_for_the_default_task():
    assert len(NEEDLES) >= 100
    assert len({f for f, _ in NEEDLES}) == len({q for _, q in NEEDLES}) == len(NEEDLES)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: longdoc.passkey_task(16), "too few for its"),
        (lambda: longdoc.passkey_task(256, documents=5, queries=6), r"queries \(6\) <= documents \(5\)"),
        (lambda: longdoc.needle_task(HAYSTACK, 256, documents=len(NEEDLES) + 1), "need as many needles"),
        (lambda: longdoc.needle_task("", 256), "haystack is empty"),
    ],
)
def test_generators_reject_impossible_requests(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# Data files


def write_data(folder, documents=3):
    """Tiny stand-ins for the three data files, in their formats."""
    folder.mkdir(parents=True, exist_ok=True)
    topics = ["budget of the remote control", "design of the new kitchen", "rules of the chess club",
              "the harvest festival", "repairs of the old bridge"][:documents]
    docs = {f"m{i}": "\n".join(f"speaker {j}: we talked about the {t} again." for j in range(3)) for i, t in enumerate(topics)}
    queries = [{"query": f"They discussed the {t}.", "relevant": [f"m{i}"]} for i, t in enumerate(topics)]
    with gzip.open(folder / "qmsum_dev.json.gz", "wt", encoding="utf-8") as f:
        json.dump({"docs": docs, "queries": queries}, f)
    with gzip.open(folder / "squality.jsonl.gz", "wt", encoding="utf-8") as f:
        for split in ("train", "dev", "test"):
            for i, t in enumerate(topics):
                story = {"split": split, "id": f"{split}{i}", "title": None, "text": f"A story about the {t}. " * 5,
                         "questions": [{"question": "What happens?", "responses": [f"It is about the {t}.", f"The {t}."]}]}
                f.write(json.dumps(story) + "\n")
    with gzip.open(folder / "pg_essays.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(3):
            f.write(json.dumps({"name": f"e{i}", "text": HAYSTACK[i * 1000:(i + 1) * 1000]}) + "\n")
    return folder


def test_loaders_read_the_data_formats(tmp_path):
    data = write_data(tmp_path / "data")
    qmsum = longdoc.qmsum_task(data / "qmsum_dev.json.gz")
    assert len(qmsum.documents) == 3 and qmsum.relevant == [frozenset({0}), frozenset({1}), frozenset({2})]
    dev = longdoc.squality_task(data / "squality.jsonl.gz", "dev")
    assert dev.name == "squality-dev" and len(dev.documents) == 3 and len(dev.queries) == 6
    assert dev.relevant[:2] == [frozenset({0})] * 2
    essays = [HAYSTACK[i * 1000:(i + 1) * 1000] for i in range(3)]
    assert longdoc.read_haystack(data / "pg_essays.jsonl.gz") == "\n".join(essays)
    names = [t.name for t in longdoc.build_tasks(["qmsum", "squality", "passkey"], data, [64, 128], 4, 2)]
    assert names == ["qmsum", "squality-dev", "squality-test", "passkey-64", "passkey-128"]


def test_loaders_name_the_file_of_a_bad_format(tmp_path):
    path = tmp_path / "qmsum_dev.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"documents": {}}, f)
    with pytest.raises(ValueError, match="qmsum_dev.json.gz: expected"):
        longdoc.qmsum_task(path)
    path = tmp_path / "squality.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"split": "dev"}\nnot json\n')
    with pytest.raises(ValueError, match="squality.jsonl.gz, line 2: not JSON"):
        longdoc.squality_task(path, "dev")


# ---------------------------------------------------------------------------------------------
# Embedding documents


def test_token_batches_cover_every_sequence_within_the_budget():
    lengths = [5, 300, 12, 12, 700, 64, 64, 64, 1]
    batches = longdoc.token_batches(lengths, 256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        assert len(batch) * longest <= 256 or len(batch) == 1


def test_document_scores_against_a_loop():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 8))
    e = rng.normal(size=(7, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    owner = np.array([0, 0, 1, 2, 2, 2, 3])
    mean = longdoc.document_scores(q, e, owner, 4, "mean")
    best = longdoc.document_scores(q, e, owner, 4, "max")
    for d in range(4):
        pooled = e[owner == d].sum(0)
        pooled /= np.linalg.norm(pooled)
        np.testing.assert_allclose(mean[:, d], q @ pooled, rtol=1e-12)
        np.testing.assert_allclose(best[:, d], (q @ e[owner == d].T).max(1), rtol=1e-12)


@pytest.fixture(scope="module")
def minilm_path():
    from lam_embed.teacher import resolve_teacher_path

    try:
        return resolve_teacher_path()
    except RuntimeError as err:
        pytest.skip(f"teacher not available: {err}")


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def test_views_cut_the_token_ids_as_described(minilm):
    tokenizer = minilm.tokenizer
    ids = [list(range(1000, 1000 + n)) for n in (0, 5, 30, 61)]
    chunks, owner = longdoc.view_sequences(tokenizer, ids, longdoc.DocumentView("chunks", 12))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert all(s[0] == cls and s[-1] == sep and len(s) <= 12 for s in chunks)
    assert owner.tolist() == [0, 1] + [2] * 3 + [3] * 7
    for doc, original in enumerate(ids):
        assert [t for s, o in zip(chunks, owner) if o == doc for t in s[1:-1]] == original
    truncated, owner = longdoc.view_sequences(tokenizer, ids, longdoc.DocumentView("truncate", 12))
    assert owner.tolist() == [0, 1, 2, 3]
    assert [s[1:-1] for s in truncated] == [x[:10] for x in ids]


def test_embeddings_equal_encode_and_do_not_depend_on_batching(minilm):
    texts = ["A short one.", "The river bank was steep and the water ran fast. " * 8, "Another text, of medium size, here."]
    sequences, _ = longdoc.view_sequences(minilm.tokenizer, longdoc.tokenize(minilm.tokenizer, texts),
                                          longdoc.DocumentView("truncate", 512))
    one_by_one = longdoc.embed_sequences(minilm, sequences, batch_tokens=1, show_progress_bar=False)
    together = longdoc.embed_sequences(minilm, sequences, batch_tokens=10_000, show_progress_bar=False)
    reference = minilm.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(one_by_one, reference, atol=2e-5)
    np.testing.assert_allclose(together, reference, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def lam_folder(tmp_path_factory, minilm_path):
    """An untrained LAM built from the teacher, saved as a sentence-transformers folder."""
    import lam_embed

    folder = tmp_path_factory.mktemp("lam") / "lam"
    lam_embed.build_sentence_transformer(lam_embed.from_teacher(), max_seq_length=512, device="cpu").save(str(folder))
    return str(folder)


def run_cli(tmp_path, *extra, models=None):
    data = tmp_path / "data"
    if not data.is_dir():
        write_data(data)
    argv = ["--data-dir", str(data), "--lengths", "64", "128", "--documents-per-length", "4",
            "--queries-per-length", "2", "--device", "cpu", *extra]
    if models is not None:
        argv += ["--models", *models]
    return longdoc.main(argv)


def test_cli_runs_every_task_and_method(tmp_path, capsys, minilm_path, lam_folder):
    out = tmp_path / "longdoc.json"
    assert run_cli(tmp_path, "--output", str(out), "--warm-passes", "1", models=[minilm_path, lam_folder]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == longdoc.SCHEMA and not (tmp_path / "longdoc.json.partial").exists()
    rows = {(r["model"], r["method"]): r for r in report["rows"]}
    minilm_name = Path(minilm_path).name
    assert set(rows) == {
        (minilm_name, "truncate-256"), (minilm_name, "truncate-512"), (minilm_name, "chunk-mean"),
        (minilm_name, "chunk-max"), ("lam", "truncate-512"), ("lam", "full-32768"), ("lam", "chunk-mean"),
        ("lam", "chunk-max"), ("-", "bm25"),
    }
    skipped = {(s["method"], s["reason"]) for s in report["skipped"]}
    assert ("full", "32768 tokens exceed the model's 512 positions") in skipped
    assert ("truncate", "the same as truncate-512") in skipped
    columns = report["columns"]
    assert columns == ["QMSum", "SQuALITY dev", "SQuALITY test", "passkey 64", "passkey 128", "passkey mean",
                       "needle 64", "needle 128", "needle mean"]
    # every document here fits in one 512-token chunk: the whole document, its first 512
    # tokens and its chunks are the same input
    for model in (minilm_name, "lam"):
        same = [rows[(model, m)]["columns"] for m in ("truncate-512", "chunk-mean", "chunk-max")]
        assert same[0] == same[1] == same[2]
    assert rows[("lam", "full-32768")]["columns"] == rows[("lam", "truncate-512")]["columns"]
    assert rows[("-", "bm25")]["columns"]["passkey mean"] == 100.0  # the name is a unique word
    for row in report["rows"]:
        assert all(0 <= v <= 100 for v in row["columns"].values())
        assert row["documents"] == 3 + 3 + 3 + 2 * 4 + 2 * 4 and row["documents_per_second"] > 0
    table = capsys.readouterr().out
    assert "| model | method | QMSum |" in table and "| lam | full-32768 |" in table


def test_cli_resumes_from_its_checkpoint(tmp_path, minilm_path):
    out = tmp_path / "longdoc.json"
    args = ["--output", str(out), "--tasks", "passkey", "--methods", "truncate", "--warm-passes", "0"]
    name = minilm_path
    assert run_cli(tmp_path, *args, models=[name]) == 0
    first = json.loads(out.read_text())
    # an interrupted run leaves its finished results in FILE.partial; a resumed run keeps them
    done = {f"{name}|truncate": {"passkey-64": {**first["rows"][0]["results"]["passkey-64"], "score": 0.25}}}
    (tmp_path / "longdoc.json.partial").write_text(json.dumps({"settings": first["settings"], "results": done}))
    assert run_cli(tmp_path, *args, "--resume", models=[name]) == 0
    resumed = json.loads(out.read_text())["rows"][0]
    assert resumed["results"]["passkey-64"]["score"] == 0.25
    assert resumed["results"]["passkey-128"]["score"] == first["rows"][0]["results"]["passkey-128"]["score"]
    # a checkpoint of other settings is not mixed in
    (tmp_path / "longdoc.json.partial").write_text(json.dumps({"settings": {"seed": 9}, "results": done}))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *args, "--resume", models=[name])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "qmsum", "novels"], "argument --tasks: invalid choice: 'novels'"),
        (["--methods", "chunk-median"], "argument --methods: invalid choice: 'chunk-median'"),
        (["--lengths", "0"], "argument --lengths: expected a positive integer, got 0"),
        (["--lengths", "32"], "--lengths: at least 64 tokens, got 32"),
        (["--queries-per-length", "5"], "--queries-per-length must not exceed --documents-per-length"),
        (["--resume"], "--resume needs --output"),
        (["--warm-passes", "-1"], "--warm-passes: expected 0 or more, got -1"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *extra, models=["unused"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_names_a_missing_data_file(tmp_path, capsys):
    (write_data(tmp_path / "data") / "squality.jsonl.gz").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, "--tasks", "qmsum", "squality", models=["unused"])
    assert exit_info.value.code == 2
    assert f"--data-dir: missing {tmp_path / 'data' / 'squality.jsonl.gz'}" in capsys.readouterr().err


def test_cli_names_a_model_that_does_not_load_and_writes_nothing(tmp_path, capsys, minilm_path):
    out = tmp_path / "longdoc.json"
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    for name in (str(bad), str(tmp_path / "missing")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(tmp_path, "--tasks", "passkey", "--output", str(out),
                    models=[minilm_path, name])
        assert exit_info.value.code == 2
        assert f"--models: cannot load {name!r}" in capsys.readouterr().err
    assert list(tmp_path.glob("longdoc.json*")) == []


def test_cli_rejects_an_output_in_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, "--output", str(tmp_path / "nowhere" / "x.json"), models=["unused"])
    assert exit_info.value.code == 2
    assert "--output: the folder" in capsys.readouterr().err


def test_the_teachers_short_name_loads_offline(minilm_path, monkeypatch):
    import argparse

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = longdoc._load_model(argparse.ArgumentParser(), "all-MiniLM-L6-v2", "cpu", "fp32")
    # get_embedding_dimension from sentence-transformers 6.3 on; the old name before
    assert (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)() == 384


def test_pooling_and_position_overflow_options_change_the_model(lam_folder):
    import argparse

    model = longdoc._load_model(argparse.ArgumentParser(), lam_folder, "cpu", "fp32", pooling="max",
                                position_overflow="clamp")
    assert model[0].auto_model.config.position_overflow == "clamp"
    pooling = [m for m in model if type(m).__name__ == "Pooling"]
    assert len(pooling) == 1 and "max" in str(pooling[0].get_config_dict())
    texts = ["a short text", "another one, a little longer than the first"]
    plain = longdoc._load_model(argparse.ArgumentParser(), lam_folder, "cpu", "fp32")
    assert not np.allclose(model.encode(texts), plain.encode(texts))
