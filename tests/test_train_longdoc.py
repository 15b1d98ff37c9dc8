"""The long-document stage (training/longdoc.py; its examples: training/longdoc_examples.py):
its examples, its loss against a computation of its own, a CPU smoke run that resumes exactly, and its usage errors."""

import copy
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lam_embed.data import default_data_dir, split_sentences
from lam_embed.training import longdoc, longdoc_examples

DATA = default_data_dir()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def words_count(sentences):
    return [len(s.split()) for s in sentences]


def synthetic_texts(n=6, sentences=40, seed=0):
    import random

    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(sentences))
            for _ in range(n)]


def test_split_sentences():
    assert split_sentences("One two. Three? Four!\n\nFive six\nSeven.") == [
        "One two.", "Three?", "Four!", "Five six", "Seven."]


def test_examples_are_deterministic_within_budget_and_differ_by_the_query_only():
    texts = synthetic_texts()
    examples = longdoc_examples.DocumentQueryExamples(texts, words_count, min_tokens=30, max_tokens=120, seed=3)
    again = longdoc_examples.DocumentQueryExamples(texts, words_count, min_tokens=30, max_tokens=120, seed=3)
    positions = []
    for number in range(200):
        query, positive, negative = examples.example(number)
        assert (query, positive, negative) == again.example(number)
        assert len(positive.split()) <= 120
        assert query in positive
        # The negative is the positive without that one sentence.
        assert sorted(negative.split() + query.split()) == sorted(positive.split())
        assert longdoc_examples.QUERY_WORDS[0] <= len(query.split()) <= longdoc_examples.QUERY_WORDS[1]
        sentences = split_sentences(positive.replace(". ", ".\n"))
        positions.append(sentences.index(query) / max(1, len(sentences) - 1))
    # Queries come from every part of the documents, not only their start.
    assert min(positions) < 0.2 and max(positions) > 0.8 and 0.35 < sum(positions) / len(positions) < 0.65
    assert examples.batch(2, 3) == tuple(map(list, zip(*(examples.example(6 + i) for i in range(3)))))


def _sourced_texts(n=6, sentences=40):
    """Texts whose sentences each start with the name of their text ("text3 ...")."""
    return ["\n".join(f"text{i} " + " ".join(WORDS[(i + j) % 10:(i + j) % 10 + 6]) + "." for j in range(sentences))
            for i in range(n)]


def _source(sentence: str) -> str:
    return sentence.split()[0]


def test_inserted_examples_hold_a_foreign_sentence_in_a_window_of_one_text():
    """--inserted-share 1: the query is a sentence of another text inserted into a window of
    one text; the negative is a window of the same text with another foreign sentence."""
    examples = longdoc_examples.DocumentQueryExamples(_sourced_texts(), words_count, min_tokens=30, max_tokens=120, seed=1,
                                             inserted_share=1.0)
    positions, offsets_differ = [], 0
    for number in range(200):
        query, positive, negative = examples.example(number)
        assert len(positive.split()) <= 120 and len(negative.split()) <= 120
        documents = [split_sentences(d) for d in (positive, negative)]
        assert query in documents[0] and query not in documents[1]
        owners = []
        for sentences in documents:
            sources = [_source(s) for s in sentences]
            owner = max(set(sources), key=sources.count)
            foreign = [s for s in sentences if _source(s) != owner]
            assert len(foreign) == 1 and len(sentences) >= 2
            owners.append((owner, foreign[0]))
        assert owners[0][0] == owners[1][0]  # both windows of one text
        assert owners[0][1] == query and owners[1][1] != query
        offsets_differ += [s for s in documents[0] if s != query] != [s for s in documents[1] if s != owners[1][1]]
        positions.append(documents[0].index(query) / (len(documents[0]) - 1))
    assert offsets_differ > 150  # the negative is cut elsewhere in the text, mostly
    assert min(positions) < 0.2 and max(positions) > 0.8 and 0.35 < sum(positions) / len(positions) < 0.65


def test_inserted_share_mixes_the_two_kinds():
    texts = _sourced_texts()
    examples = longdoc_examples.DocumentQueryExamples(texts, words_count, min_tokens=30, max_tokens=120, seed=2,
                                             inserted_share=0.5)
    inserted = 0
    for number in range(200):
        query, positive, _ = examples.example(number)
        others = [s for s in split_sentences(positive) if s != query]
        inserted += _source(query) != _source(others[0])
    assert 70 < inserted < 130


class _LookupTeacher:
    """A teacher whose embeddings are given: paraphrase mining calls encode only."""

    def __init__(self, vectors: dict):
        self.vectors = vectors

    def encode(self, sentences, **kwargs):
        return F.normalize(torch.stack([self.vectors[s] for s in sentences]), dim=-1)


def test_paraphrase_pairs_are_the_related_sentences_within_the_band():
    generator = torch.Generator().manual_seed(0)
    sentences = [f"sentence number {i} has enough words here" for i in range(7)]
    vectors = {s: torch.randn(8, generator=generator) for s in sentences}
    # Near-copies of sentence 0 and 1 (above the band), and a short line that is never a query.
    vectors[sentences[2]] = vectors[sentences[0]] + 0.01
    vectors["too short."] = vectors[sentences[1]]
    low, high = 0.1, 0.95
    pairs = longdoc_examples.paraphrase_pairs(_LookupTeacher(vectors), sentences + ["too short."], count=100, low=low,
                                     high=high, seed=0)
    unit = {s: F.normalize(v, dim=0) for s, v in vectors.items()}
    want = {frozenset((a, b)) for i, a in enumerate(sentences) for b in sentences[i + 1:]
            if low <= float(unit[a] @ unit[b]) < high}
    assert want and {frozenset(p) for p in pairs} == want and len(pairs) == len(want)
    scores = [float(unit[a] @ unit[b]) for a, b in pairs]
    assert scores == sorted(scores, reverse=True)
    assert frozenset((sentences[0], sentences[2])) not in want  # the near-copy is left out


def _pair_sentence(number: int, side: str) -> str:
    return f"pair{number} {side} " + " ".join(WORDS[number % 10:number % 10 + 5]) + "."


def test_inserted_examples_with_pairs_query_with_the_other_sentence_of_a_pair():
    """With pairs, the positive holds the partner of the query (never the query itself) and
    the negative a sentence of another pair; either side of a pair can be the query."""
    pairs = [(_pair_sentence(i, "left"), _pair_sentence(i, "right")) for i in range(8)]
    partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}

    def build():
        return longdoc_examples.DocumentQueryExamples(_sourced_texts(), words_count, min_tokens=30, max_tokens=120, seed=1,
                                             inserted_share=1.0, pairs=pairs)

    examples, sides = build(), set()
    for number in range(100):
        query, positive, negative = examples.example(number)
        assert query in partner
        documents = [split_sentences(d) for d in (positive, negative)]
        assert partner[query] in documents[0] and query not in documents[0]
        in_negative = [s for s in documents[1] if s in partner]
        assert len(in_negative) == 1 and in_negative[0] not in (query, partner[query])
        assert [s for s in documents[0] if s in partner] == [partner[query]]
        sides.add(query.split()[1])
        assert build().example(number) == (query, positive, negative)
    assert sides == {"left", "right"}


def test_examples_fail_clearly_when_no_window_fits():
    examples = longdoc_examples.DocumentQueryExamples(["Short."], words_count, min_tokens=1, max_tokens=2, seed=0)
    with pytest.raises(ValueError, match="raise --min-tokens"):
        examples.example(0)


def test_read_long_texts_keeps_the_split_and_names_bad_lines(tmp_path):
    path = tmp_path / "s.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for split in ("train", "dev", "test", "train"):
            f.write(json.dumps({"split": split, "text": f"a {split} story"}) + "\n")
    assert longdoc_examples.read_long_texts(path, split="train") == ["a train story", "a train story"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not JSON"):
        longdoc_examples.read_long_texts(bad)
    with pytest.raises(ValueError, match="no texts of split 'validation'"):
        longdoc_examples.read_long_texts(path, split="validation")


@pytest.fixture(scope="module")
def tiny_model():
    """A small LAM sentence-transformer (two layers of the teacher) and the teacher."""
    from conftest import small_lam_sentence_transformer
    from sentence_transformers import SentenceTransformer

    model, teacher_path = small_lam_sentence_transformer()
    model.max_seq_length = 64
    return model.eval(), SentenceTransformer(teacher_path, device="cpu").eval()


def test_stage_loss_equals_an_independent_computation(tiny_model):
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:
        from sentence_transformers import losses
    model, teacher = tiny_model
    queries = ["the red house", "a quiet river", "seven blue birds"]
    positives = ["we saw the red house by the road", "a quiet river ran below", "seven blue birds sang"]
    negatives = ["we saw it by the road", "it ran below the hill", "they sang all day"]
    short = ["a short text", "another one"]
    passages = ["a longer passage of several words, as a corpus passage would be", "and one more of them"]
    target, passage_target = torch.tensor(teacher.encode(short)), torch.tensor(teacher.encode(passages))
    feats = [model.tokenize(x) for x in (queries, positives, negatives)]
    with torch.no_grad():
        loss, rank, keep = longdoc.stage_loss(
            losses.MultipleNegativesRankingLoss(model, scale=20.0), losses.MSELoss(model), feats,
            [(model.tokenize(short), target), (model.tokenize(passages), passage_target)], 7.0)
        q, p, n = (model(f)["sentence_embedding"] for f in feats)
        s = model(model.tokenize(short))["sentence_embedding"]
        s_passages = model(model.tokenize(passages))["sentence_embedding"]
    # InfoNCE over [documents; negatives]: query i's positive is column i.
    scores = 20.0 * F.normalize(q, dim=-1) @ F.normalize(torch.cat([p, n]), dim=-1).T
    want_rank = F.cross_entropy(scores, torch.arange(3))
    want_keep = ((s - target) ** 2).mean()
    want_passages = ((s_passages - passage_target) ** 2).mean()
    torch.testing.assert_close(rank, want_rank, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keep[0], want_keep, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(keep[1], want_passages, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss, want_rank + 7.0 * (want_keep + want_passages), rtol=1e-5, atol=1e-6)
    # The short-text tail: no ranking term, sentences only.
    with torch.no_grad():
        tail_loss, tail_rank, tail_keep = longdoc.stage_loss(
            None, losses.MSELoss(model), None, [(model.tokenize(short), target)], 7.0)
    assert tail_rank is None and len(tail_keep) == 1
    torch.testing.assert_close(tail_keep[0], want_keep, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(tail_loss, 7.0 * want_keep, rtol=1e-5, atol=1e-8)


def _smoke_args(tmp_path: Path, model_dir: str, articles: Path, sentences: Path, out: str, *extra: str) -> list[str]:
    return ["--model", model_dir, "--articles", str(articles), "--squality", "", "--sentences", str(sentences),
            "--output-dir", str(tmp_path / out), "--steps", "3", "--batch-size", "2", "--sentence-batch-size", "3",
            "--min-tokens", "20", "--max-tokens", "60", "--device", "cpu", "--save-every", "100", *extra]


@pytest.mark.slow
def test_smoke_run_resumes_exactly(tmp_path, tiny_model, one_torch_thread):
    from safetensors.torch import load_file

    model, _ = tiny_model
    model_dir = str(tmp_path / "start")
    model.save(model_dir)
    articles = tmp_path / "articles.jsonl"
    articles.write_text("".join(json.dumps({"title": str(i), "text": t}) + "\n" for i, t in enumerate(synthetic_texts())))
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(" ".join(WORDS[i:i + 5]) for i in range(12)) + "\n")

    whole = longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "whole"))
    assert whole["finished"] and whole["step"] == 3
    manifest = json.loads((tmp_path / "whole" / "release" / "manifest.json").read_text())
    assert manifest["command"].startswith("python scripts/train_longdoc.py") and manifest["steps"] == 3
    assert "embeddings.word_embeddings.weight" not in load_file(tmp_path / "whole" / "release" / "lam_weights.safetensors")
    first = longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "parts", "--stop-after-minutes", "1e-6"))
    assert not first["finished"] and first["step"] == 1
    second = longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "parts", "--resume"))
    assert second["finished"] and second["step"] == 3
    # The resumed run records the command of the whole run.
    resumed_manifest = json.loads((tmp_path / "parts" / "release" / "manifest.json").read_text())
    assert resumed_manifest["command"] == manifest["command"].replace(str(tmp_path / "whole"), str(tmp_path / "parts"))
    whole_weights = load_file(tmp_path / "whole" / "release" / "lam_weights.safetensors")
    resumed = load_file(tmp_path / "parts" / "release" / "lam_weights.safetensors")
    assert whole_weights.keys() == resumed.keys()
    for name in whole_weights:
        assert torch.equal(whole_weights[name], resumed[name]), name


def _saved_model_and_data(tmp_path, tiny_model):
    """The tiny model saved as a folder, an articles file and a sentences file."""
    model, _ = tiny_model
    model_dir = str(tmp_path / "start")
    model.save(model_dir)
    articles = tmp_path / "articles.jsonl"
    articles.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts()))
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(" ".join(WORDS[i:i + 5]) for i in range(12)) + "\n")
    return model_dir, articles, sentences


@pytest.mark.slow
def test_pooling_option_is_trained_with_and_recorded(tmp_path, tiny_model):
    """--pooling max: the saved model pools by max (so its embeddings are the max over the
    tokens of the saved model's token embeddings) and the release's manifest records it."""
    from sentence_transformers import SentenceTransformer

    from lam_embed.sentence_transformer import pooling_mode

    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "max", "--steps", "1", "--pooling", "max"))
    manifest = json.loads((tmp_path / "max" / "release" / "manifest.json").read_text())
    assert manifest["pooling"] == "max"
    trained = SentenceTransformer(str(tmp_path / "max" / "sentence-transformer"), device="cpu")
    assert pooling_mode(trained) == "max"
    text = "alpha beta gamma delta."
    tokens = trained.encode(text, output_value="token_embeddings", convert_to_tensor=True)
    want = F.normalize(tokens.max(dim=0).values, dim=-1)
    torch.testing.assert_close(trained.encode(text, convert_to_tensor=True), want, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_token_repeat_cap_option_is_trained_with_and_recorded(tmp_path, tiny_model):
    """--token-repeat-cap 2: the saved model and the release's config carry the cap, the
    manifest records it, and 'none' turns a cap off."""
    from sentence_transformers import SentenceTransformer

    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "cap", "--steps", "1", "--token-repeat-cap", "2"))
    assert json.loads((tmp_path / "cap" / "release" / "manifest.json").read_text())["token_repeat_cap"] == 2
    assert json.loads((tmp_path / "cap" / "release" / "config.json").read_text())["token_repeat_cap"] == 2
    trained = SentenceTransformer(str(tmp_path / "cap" / "sentence-transformer"), device="cpu")
    assert trained[0].auto_model.config.token_repeat_cap == 2
    longdoc.main(_smoke_args(tmp_path, str(tmp_path / "cap" / "sentence-transformer"), articles, sentences, "off",
                             "--steps", "1", "--token-repeat-cap", "none"))
    assert json.loads((tmp_path / "off" / "release" / "config.json").read_text())["token_repeat_cap"] is None


@pytest.mark.slow
def test_token_weights_stay_as_set_through_the_stage_and_are_released(tmp_path, tiny_model):
    """A model with token weights trains with them (they are not parameters: the trained model
    and its release hold them unchanged); the manifest records them, --inserted-share and
    --outlier-pooling-temperature, which the release's config keeps."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from lam_embed.token_weights import set_token_weights

    model, _ = tiny_model
    weighted = copy.deepcopy(model)
    weights = torch.linspace(0.2, 1.0, weighted[0].auto_model.config.vocab_size)
    set_token_weights(weighted[0].auto_model, weights, 8)
    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    weighted.save(str(tmp_path / "weighted"))
    longdoc.main(_smoke_args(tmp_path, str(tmp_path / "weighted"), articles, sentences, "w", "--steps", "2",
                             "--inserted-share", "1", "--outlier-pooling-temperature", "5"))
    manifest = json.loads((tmp_path / "w" / "release" / "manifest.json").read_text())
    assert manifest["token_weights_min_tokens"] == 8 and manifest["inserted_share"] == 1.0
    assert manifest["outlier_pooling_temperature"] == 5.0
    config = json.loads((tmp_path / "w" / "release" / "config.json").read_text())
    assert config["token_weights_min_tokens"] == 8 and config["outlier_pooling_temperature"] == 5.0
    released = load_file(tmp_path / "w" / "release" / "lam_weights.safetensors")["token_weights"]
    torch.testing.assert_close(released.float(), weights, atol=1e-3, rtol=1e-3)  # fp16 in the release
    trained = SentenceTransformer(str(tmp_path / "w" / "sentence-transformer"), device="cpu")
    assert torch.equal(trained[0].auto_model.token_weights, weights)
    assert trained[0].auto_model.config.token_weights_min_tokens == 8


def _one_line_inputs(tmp_path):
    """An articles file and a sentences file of one line each, for runs that stop before training."""
    articles = tmp_path / "a.jsonl"
    articles.write_text(json.dumps({"text": "x"}) + "\n")
    sentences = tmp_path / "s.txt"
    sentences.write_text("a\n")
    return articles, sentences


def test_usage_errors_name_the_option_before_any_model_loads(tmp_path, capsys):
    articles, sentences = _one_line_inputs(tmp_path)
    base = ["--model", "/nonexistent", "--articles", str(articles), "--sentences", str(sentences), "--squality", "",
            "--output-dir", str(tmp_path / "o")]
    cases = [
        (["--articles", str(tmp_path / "missing.jsonl")], "--articles: no file"),
        (["--min-tokens", "500", "--max-tokens", "100"], "--min-tokens (500) must not exceed --max-tokens (100)"),
        (["--resume"], "--resume: no checkpoint"),
        (["--steps", "0"], "must be a positive integer, got 0"),
        (["--inserted-share", "1.5"], "--inserted-share must lie in [0, 1], got 1.5"),
        (["--outlier-pooling-temperature", "-2"], "must be a positive number or 'none', got -2"),
        (["--train-only-token-mixers", "--train-embeddings"], "--train-only-token-mixers leaves the embeddings"),
        (["--dropout", "1"], "--dropout must lie in [0, 1), got 1.0"),
        (["--short-text-tail-steps", "-1"], "--short-text-tail-steps must be >= 0, got -1"),
        (["--short-text-tail-lr", "0"], "--short-text-tail-lr must be positive, got 0.0"),
        (["--long-input-min-tokens", "-1"], "--long-input-min-tokens: must be an integer >= 0, got -1"),
        (["--long-input-min-tokens", "8", "--short-text-tail-steps", "2"],
         "--long-input-min-tokens trains the long-input layers only: drop --short-text-tail-steps"),
        (["--lr", "0"], "--lr must be positive (or 0 with --pooling-gate: the gate alone trains), got 0.0"),
        (["--pooling-gate"], "--pooling-gate trains with the long-input layers: give --long-input-min-tokens too"),
        (["--long-input-min-tokens", "8", "--pooling-gate", "--pooling-gate-lr", "0"],
         "--pooling-gate-lr must be positive, got 0.0"),
        (["--paraphrase-queries", "10"], "--paraphrase-queries makes the queries of inserted examples: give "
                                         "--inserted-share too"),
        (["--paraphrase-similarity", "0.9", "0.5"], "--paraphrase-similarity: need -1 <= LOW < HIGH <= 1, got 0.9 0.5"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            longdoc.main(base + extra)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit):
        longdoc.main(base + ["--sentences", str(empty)])
    assert "--sentences: no lines" in capsys.readouterr().err


def test_passage_term_never_reads_the_held_out_passages(tmp_path, monkeypatch, capsys):
    articles, sentences = _one_line_inputs(tmp_path)
    passages = tmp_path / "p.txt"
    passages.write_text("".join(f"passage {i}\n" for i in range(10)))
    seen = {}
    monkeypatch.setattr(longdoc, "train", lambda args, texts, sentences, passages, argv, stsb: seen.update(p=passages))
    base = ["--articles", str(articles), "--sentences", str(sentences), "--squality", "", "--output-dir",
            str(tmp_path / "o"), "--passages", str(passages), "--passage-holdout", "3"]
    longdoc.main(base + ["--passage-batch-size", "2"])
    assert seen["p"] == [f"passage {i}" for i in range(7)]
    longdoc.main(base)  # no term, nothing read
    assert seen["p"] == []
    for extra, message in [(["--passage-batch-size", "2", "--passage-holdout", "10"], "no lines in"),
                           (["--passage-batch-size", "-1"], "must not be negative"),
                           (["--passage-batch-size", "2", "--passages", str(tmp_path / "none.txt")], "--passages: no file")]:
        with pytest.raises(SystemExit):
            longdoc.main(base + extra)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_only_token_mixers_leaves_everything_else_as_loaded(tmp_path, tiny_model):
    from safetensors.torch import load_file

    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "mixers", "--steps", "2",
                             "--train-only-token-mixers"))
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "all", "--steps", "2"))
    start = tiny_model[0][0].auto_model.state_dict()
    for run, mixers_only in (("mixers", True), ("all", False)):
        release = tmp_path / run / "release"
        weights = {**load_file(release / "lam_weights.safetensors")}
        for extra in release.glob("lam_weights-*.safetensors"):
            weights.update(load_file(extra))
        moved = {name for name, value in weights.items() if not torch.equal(value, start[name].to(value.dtype))}
        assert any(".delta_net." in name for name in moved), run
        others = {name for name in moved if ".delta_net." not in name}
        assert (not others) if mixers_only else others, (run, sorted(others)[:3])
    manifest = json.loads((tmp_path / "mixers" / "release" / "manifest.json").read_text())
    assert manifest["trained"] == "token mixers"


def test_dropout_option_reaches_training_and_leaves_the_saved_config(tmp_path, tiny_model):
    """--dropout sets the dropout used while training (a run with 0 takes other steps than one
    with the model's own 0.1), the manifest records it, and the saved model keeps its config."""
    from safetensors.torch import load_file

    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    own = tiny_model[0][0].auto_model.config.hidden_dropout_prob
    assert own > 0
    runs = {"own": (), "off": ("--dropout", "0")}
    for run, extra in runs.items():
        longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, run, "--steps", "1", *extra))
    manifests = {run: json.loads((tmp_path / run / "release" / "manifest.json").read_text()) for run in runs}
    assert manifests["own"]["dropout"] == own and manifests["off"]["dropout"] == 0.0
    losses_ = {run: json.loads((tmp_path / run / "history.json").read_text())[0]["ranking_loss"] for run in runs}
    assert losses_["own"] != losses_["off"]
    weights = {run: load_file(tmp_path / run / "release" / "lam_weights.safetensors") for run in runs}
    assert any(not torch.equal(weights["own"][name], weights["off"][name]) for name in weights["own"])
    saved = json.loads((tmp_path / "off" / "sentence-transformer" / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == own


def test_mini_batches_give_the_step_of_the_whole_batch(tmp_path, tiny_model):
    """--mini-batch-size embeds the ranking term's inputs a few at a time (gradient caching):
    the losses and the trained weights equal those of the whole batch in one pass, and the
    manifest says which was used."""
    from safetensors.torch import load_file

    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    runs = {"whole": (), "mini": ("--mini-batch-size", "1")}
    for run, extra in runs.items():
        longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, run, "--steps", "2", "--batch-size", "3",
                                 "--dropout", "0", "--lr", "1e-3", *extra))
    manifests = {run: json.loads((tmp_path / run / "release" / "manifest.json").read_text()) for run in runs}
    assert manifests["whole"]["mini_batch_size"] is None and manifests["mini"]["mini_batch_size"] == 1
    histories = {run: json.loads((tmp_path / run / "history.json").read_text()) for run in runs}
    for whole, mini in zip(histories["whole"], histories["mini"], strict=True):
        assert mini["ranking_loss"] == pytest.approx(whole["ranking_loss"], rel=1e-4)
    start = load_file(Path(model_dir) / "model.safetensors")
    trained = {run: load_file(tmp_path / run / "sentence-transformer" / "model.safetensors") for run in runs}

    def distance(first: dict, second: dict) -> float:
        return math.sqrt(sum(((first[name] - tensor).double() ** 2).sum().item() for name, tensor in second.items()))

    moved, apart = distance(trained["whole"], start), distance(trained["mini"], trained["whole"])
    # Adam turns the rounding differences of near-zero gradients into steps of up to lr, so single
    # weights can differ by a tenth of what they moved; over all weights the two runs agree to
    # about 1e-4 of the distance they moved, where a step from other gradients is of its order.
    assert moved > 1e-2 and apart < 1e-3 * moved, (moved, apart)


def test_short_text_tail_follows_the_stage_without_its_ranking_term(tmp_path, tiny_model):
    """--short-text-tail-steps adds steps after --steps with no ranking term, at a learning rate
    falling linearly from --short-text-tail-lr; the manifest counts them."""
    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "tail", "--steps", "2", "--lr", "1e-4",
                             "--short-text-tail-steps", "2", "--short-text-tail-lr", "3e-5"))
    history = json.loads((tmp_path / "tail" / "history.json").read_text())
    assert [record["step"] for record in history] == [1, 2, 3, 4]
    assert all(record["ranking_loss"] is not None for record in history[:2])
    assert all(record["ranking_loss"] is None and record["short_text_loss"] > 0 for record in history[2:])
    # Each record holds the learning rate of the step after it.
    assert [record["lr"] for record in history[1:]] == pytest.approx([3e-5, 1.5e-5, 0.0])
    manifest = json.loads((tmp_path / "tail" / "release" / "manifest.json").read_text())
    assert manifest["steps"] == 4 and manifest["short_text_tail_steps"] == 2
    assert manifest["short_text_tail_lr"] == 3e-5


def test_short_text_batch_draws_its_share_of_stsb_train_sentences():
    import random

    sentences = [f"corpus {i}" for i in range(100)]
    extra = [f"stsb {i}" for i in range(30)]
    # Without STS-B sentences the batch is the plain sample of the runs made before the option.
    assert longdoc.short_text_batch(random.Random(5), sentences, [], 16, 0.25) == random.Random(5).sample(sentences, 16)
    assert longdoc.short_text_batch(random.Random(5), sentences, extra, 16, 0.0) == random.Random(5).sample(sentences, 16)
    batch = longdoc.short_text_batch(random.Random(5), sentences, extra, 16, 0.25)
    assert batch == longdoc.short_text_batch(random.Random(5), sentences, extra, 16, 0.25)
    assert len(batch) == len(set(batch)) == 16
    assert sum(text.startswith("stsb") for text in batch) == 4
    assert set(batch) <= set(sentences) | set(extra)


def test_stsb_train_fraction_reads_only_the_train_sentences(tmp_path, monkeypatch, capsys):
    articles, sentences = _one_line_inputs(tmp_path)
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    (stsb / "sts-train.csv").write_text("g\tf\ty\t1\t5.0\tA plane takes off.\tA jet takes off.\n"
                                        "g\tf\ty\t2\t1.0\tA man sings.\tA plane takes off.\n")
    seen = {}
    monkeypatch.setattr(longdoc, "train", lambda args, texts, sentences, passages, argv, stsb: seen.update(s=stsb))
    base = ["--articles", str(articles), "--sentences", str(sentences), "--squality", "", "--output-dir",
            str(tmp_path / "o"), "--stsb", str(stsb)]
    longdoc.main(base + ["--stsb-train-fraction", "0.25"])
    assert seen["s"] == ["A jet takes off.", "A man sings.", "A plane takes off."]
    longdoc.main(base)  # no share, nothing read
    assert seen["s"] == []
    for extra, message in [(["--stsb-train-fraction", "1"], "--stsb-train-fraction must lie in [0, 1), got 1.0"),
                           (["--stsb-train-fraction", "0.2", "--stsb", str(tmp_path)], "--stsb: STS-B file")]:
        with pytest.raises(SystemExit):
            longdoc.main(base + extra)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_with_the_passage_term(tmp_path, tiny_model):
    """Passages are trained in the stage's steps and left out of the short-text tail."""
    model_dir, articles, sentences = _saved_model_and_data(tmp_path, tiny_model)
    passages = tmp_path / "passages.txt"
    passages.write_text("".join(" ".join(WORDS[i:]) + ".\n" for i in range(8)))
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    (stsb / "sts-train.csv").write_text("".join(f"g\tf\ty\t{i}\t3.0\t{' '.join(WORDS[i:i + 4])}.\t{WORDS[i]} again.\n"
                                                for i in range(5)))
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, sentences, "p", "--steps", "2", "--passages",
                             str(passages), "--passage-batch-size", "2", "--passage-holdout", "2",
                             "--stsb", str(stsb), "--stsb-train-fraction", "0.5", "--short-text-tail-steps", "1"))
    history = json.loads((tmp_path / "p" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["passage_loss"] > 0 for h in history[:2])
    assert history[2]["ranking_loss"] is None and "passage_loss" not in history[2]
    manifest = json.loads((tmp_path / "p" / "release" / "manifest.json").read_text())
    assert manifest["data"]["passage_texts"] == 6 and manifest["data"]["stsb_train_sentences"] == 10


@pytest.mark.skipif(DATA is None or not (DATA / "longdoc").is_dir(), reason="shared data folder not found")
def test_training_texts_hold_no_evaluation_material():
    """The stage reads Wikipedia articles and SQuALITY train only: no passkey line or filler,
    no story of SQuALITY dev or test."""
    from lam_embed.evaluation.longdoc import PASSKEY_FILLER

    texts = longdoc_examples.read_long_texts(DATA / "longdoc" / "squality.jsonl.gz", split="train")
    held_out = set(longdoc_examples.read_long_texts(DATA / "longdoc" / "squality.jsonl.gz", split="dev")
                   + longdoc_examples.read_long_texts(DATA / "longdoc" / "squality.jsonl.gz", split="test"))
    assert not held_out & set(texts)
    filler = PASSKEY_FILLER.split(". ")[0]
    for text in longdoc_examples.read_long_texts(DATA / "longdoc" / "wiki_articles.jsonl.gz")[:500] + texts:
        assert "pass key" not in text and filler not in text


@pytest.mark.slow
def test_long_input_layers_train_alone_and_short_inputs_keep_their_embeddings(tmp_path, tiny_model):
    """--long-input-min-tokens: a second set of layers, started as a copy, is the only thing
    trained; the first set (which reads the queries and every input of up to N tokens) and the
    embeddings stay as loaded, so short texts embed exactly as before; no sentences are read."""
    from lam_embed import LAMModel

    model_dir, articles, _ = _saved_model_and_data(tmp_path, tiny_model)
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, tmp_path / "no-such-file.txt", "long", "--steps", "2",
                             "--lr", "1e-3", "--long-input-min-tokens", "12"))
    start = tiny_model[0][0].auto_model
    trained = LAMModel.from_pretrained(tmp_path / "long" / "sentence-transformer")
    assert trained.config.long_input_min_tokens == 12
    before, after = start.state_dict(), trained.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    moved = [name for name in after if name.startswith("long_input_layers.")
             and not torch.equal(after[name], before[name.removeprefix("long_input_")])]
    assert moved
    history = json.loads((tmp_path / "long" / "history.json").read_text())
    assert all("short_text_loss" not in record and record["ranking_loss"] > 0 for record in history)
    manifest = json.loads((tmp_path / "long" / "release" / "manifest.json").read_text())
    assert manifest["trained"] == "long-input layers" and manifest["long_input_min_tokens"] == 12
    assert manifest["data"]["sentences"] is None and manifest["data"]["short_texts"] == 0


@pytest.mark.slow
def test_pooling_gate_trains_with_the_long_input_layers_and_short_inputs_keep_their_embeddings(tmp_path, tiny_model):
    """--pooling-gate: the gate starts at zero and moves with the long-input layers at its own
    rate; the first set and the embeddings stay as loaded, so short texts embed as before; the
    release and its manifest carry it."""
    from lam_embed import LAMModel
    from lam_embed.release import load_release

    model_dir, articles, _ = _saved_model_and_data(tmp_path, tiny_model)
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, tmp_path / "no-such-file.txt", "gate", "--steps", "2",
                             "--lr", "1e-3", "--long-input-min-tokens", "12", "--pooling-gate",
                             "--pooling-gate-lr", "1e-2"))
    start = tiny_model[0][0].auto_model
    trained = LAMModel.from_pretrained(tmp_path / "gate" / "sentence-transformer")
    assert trained.config.pooling_gate_min_tokens == 12
    before, after = start.state_dict(), trained.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    # Adam's first steps move each value by about the rate: the gate's, not the layers'.
    assert 0.01 < trained.pooling_gate.weight.abs().max() < 0.03
    history = json.loads((tmp_path / "gate" / "history.json").read_text())
    assert history[-1]["pooling_gate_norm"] == pytest.approx(float(trained.pooling_gate.weight.detach().norm()), abs=1e-4)
    manifest = json.loads((tmp_path / "gate" / "release" / "manifest.json").read_text())
    assert manifest["trained"] == "long-input layers and pooling gate"
    assert manifest["pooling_gate_min_tokens"] == 12 and manifest["pooling_gate_lr"] == 1e-2
    released = load_release(tmp_path / "gate" / "release")
    torch.testing.assert_close(released.pooling_gate.weight, trained.pooling_gate.weight, atol=1e-4, rtol=1e-3)
    # --lr 0: the gate alone; the long-input layers stay the copy of the first set.
    longdoc.main(_smoke_args(tmp_path, model_dir, articles, tmp_path / "no-such-file.txt", "gate-only", "--steps", "2",
                             "--lr", "0", "--long-input-min-tokens", "12", "--pooling-gate"))
    gate_only = LAMModel.from_pretrained(tmp_path / "gate-only" / "sentence-transformer")
    after = gate_only.state_dict()
    assert all(torch.equal(after[name], after[name.removeprefix("long_input_")])
               for name in after if name.startswith("long_input_layers."))
    assert gate_only.pooling_gate.weight.abs().max() > 1e-3
    manifest = json.loads((tmp_path / "gate-only" / "release" / "manifest.json").read_text())
    assert manifest["trained"] == "pooling gate"


def test_paraphrase_queries_are_mined_once_and_read_back_on_resume(tmp_path, tiny_model, monkeypatch):
    """--paraphrase-queries with the long-input layers alone: the sentences are read for the
    pairs only, the pairs are saved with the run and a resumed run reads them instead of
    mining again; the manifest counts them."""
    model_dir, articles, _ = _saved_model_and_data(tmp_path, tiny_model)
    sentences = tmp_path / "queries.txt"
    sentences.write_text("\n".join(" ".join(WORDS[i:i + 8]) for i in range(10)) + "\n")
    args = _smoke_args(tmp_path, model_dir, articles, sentences, "pairs", "--long-input-min-tokens", "12",
                       "--inserted-share", "1", "--paraphrase-queries", "10", "--paraphrase-similarity", "-1", "1")
    first = longdoc.main(args + ["--stop-after-minutes", "1e-6"])
    assert not first["finished"]
    saved = json.loads((tmp_path / "pairs" / longdoc_examples.PAIRS_FILE).read_text())
    assert len(saved) >= 2 and all(len(pair) == 2 for pair in saved)

    def mined_again(*args, **kwargs):
        raise AssertionError("a resumed run mines its pairs again")

    monkeypatch.setattr(longdoc, "paraphrase_pairs", mined_again)
    assert longdoc.main(args + ["--resume"])["finished"]
    manifest = json.loads((tmp_path / "pairs" / "release" / "manifest.json").read_text())
    assert manifest["data"]["paraphrase_pairs"] == len(saved) and manifest["data"]["short_texts"] == 0
    assert manifest["data"]["paraphrase_similarity"] == [-1.0, 1.0]
