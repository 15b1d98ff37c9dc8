"""scripts/benchmark_encode.py (evaluation/encode_pipeline.py) end to end on CPU with a small
LAM and tiny text sets: every row, the ratios, a first call in a fresh process, usage errors."""

import gzip
import json

import pytest

from lam_embed.evaluation import encode_pipeline

WORDS = "the a river house blue seven quiet old road bird sang ran below over hill".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import small_lam_sentence_transformer

    folder = tmp_path_factory.mktemp("encode")
    model, teacher = small_lam_sentence_transformer()
    model.save(str(folder / "lam"))
    data = folder / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "longdoc").mkdir()
    for name, words in (("sentences", 8), ("passages", 120)):
        with gzip.open(data / "corpus" / f"{name}.txt.gz", "wt") as f:
            f.writelines(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words + i)) + "\n" for i in range(30))
    with gzip.open(data / "longdoc" / "wiki_articles.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"title": str(i), "text": " ".join(WORDS * (70 + 10 * i))}) + "\n" for i in range(3))
    return folder, teacher


def args_for(folder, teacher, *extra):
    return ["--lam", str(folder / "lam"), "--minilm", teacher, "--data-dir", str(folder / "data"), "--sentences", "30",
            "--passages", "12", "--documents", "3", "--document-tokens", "1024", "--minilm-batch-sizes", "8", "16",
            "--batch-tokens", "2048", "--repeats", "1", "--device", "cpu", *extra]


def test_every_row_and_ratio(setup, tmp_path):
    folder, teacher = setup
    output = tmp_path / "encode.json"
    assert encode_pipeline.main(args_for(folder, teacher, "--no-fresh", "--output", str(output))) == 0
    result = json.loads(output.read_text())
    assert result["provenance"]["command"].startswith("python") and set(result["sets"]) == set(encode_pipeline.SETS)
    documents = result["sets"]["documents"]
    assert set(documents["rows"]) == {"lam encode_texts", "lam encode@256", "minilm chunk-mean"}
    assert set(result["sets"]["passages"]["rows"]) == {"lam encode_texts", "lam encode@256", "minilm encode@8",
                                                       "minilm encode@16"}
    # Articles of 1,050 to 1,350 words, read up to 1,024 tokens by LAM.
    assert documents["texts"] == 3 and documents["tokens"] == 3 * 1024
    for entry in result["sets"].values():
        fast = entry["rows"]["lam encode_texts"]
        assert entry["rows"]["lam encode@256"]["max_abs_diff_to_encode_texts"] < 1e-5
        assert entry["warm_share_of_forward"] == pytest.approx(fast["warm_tokens_per_s"] / entry["lam_forward_tokens_per_s"])
        assert entry["warm_x_minilm_best"] > 0 and fast["warm_texts_per_s"] == pytest.approx(entry["texts"] / fast["warm_s"])
        assert entry["tokenize_tokens_per_s"] > 0
    assert result["host"]["cpu_count"] >= 1 and "tokenizers_parallelism" in result["host"]


def test_first_call_in_a_fresh_process(setup):
    folder, teacher = setup
    # The child is given the parent's options, the tokenizer's threads among them.
    args = encode_pipeline.parse_args(args_for(folder, teacher, "--tokenizer-threads", "2", "--tokenizer-processes"))
    seconds = encode_pipeline.first_call(args, "sentences", "lam encode_texts", str(folder / "lam"), 512)
    assert 0 < seconds < 60


def test_usage_errors(setup, capsys):
    folder, teacher = setup
    for extra, message in ((["--repeats", "0"], "--repeats must be a positive integer"),
                           (["--tokenizer-threads", "0"], "--tokenizer-threads must be a positive integer"),
                           (["--data-dir", str(folder / "none")], "--data-dir: no folder"),
                           (["--lam", str(folder / "none")], "--lam: no folder")):
        with pytest.raises(SystemExit):
            encode_pipeline.main(args_for(folder, teacher) + extra)
        assert message in capsys.readouterr().err


def test_a_single_threaded_tokenizer_is_recorded_and_warned_of(setup, tmp_path, monkeypatch, caplog):
    folder, teacher = setup
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    output = tmp_path / "encode.json"
    with caplog.at_level("WARNING"):
        assert encode_pipeline.main(args_for(folder, teacher, "--no-fresh", "--output", str(output))) == 0
    assert json.loads(output.read_text())["host"]["tokenizers_parallelism"] == "false"
    assert "each tokenizer call runs on one thread" in caplog.text
