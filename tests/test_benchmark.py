"""The benchmark script (evaluation/benchmark.py): a tiny CPU run end to end, the
option checks, and the pieces that keep one failed measurement from ending a run."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from lam_embed.evaluation import benchmark

SENTENCES = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "Two dogs run through a field of tall grass.",
    "The stock market fell sharply on Monday.",
]


def _write_tiny_stsb(folder):
    # load_stsb reads the original tab-separated layout: 4 fields, score, sentence1, sentence2.
    lines = [
        "\t".join(["main-captions", "MSRvid", "2012test", f"{i:04d}", f"{i + 0.5}", a, b])
        for i, (a, b) in enumerate(zip(SENTENCES, reversed(SENTENCES)))
    ]
    (folder / "sts-test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _write_tiny_articles(folder):
    """Three texts, two of them long enough for documents of 60 tokens."""
    texts = [" ".join(SENTENCES * 4), "Too short.", " ".join(reversed(SENTENCES * 4))]
    path = folder / "articles.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, minilm_onnx):
    """One tiny CPU run shared by the tests below (loading the models dominates its time),
    with the ONNX peers (exported once for the session)."""
    tmp = tmp_path_factory.mktemp("bench")
    stsb = _write_tiny_stsb(tmp)
    output = tmp / "out" / "bench.json"
    argv = [
        "--device", "cpu", "--lengths", "128", "--cpu-tokens", "128", "--repeats", "1", "--warmup", "1",
        "--impls", "chunk", "triton", "--sentences", "6", "--batch-size", "4", "--stsb", str(stsb),
        "--documents", "2", "--document-tokens", "60", "--articles", str(_write_tiny_articles(tmp)),
        "--onnx-dir", str(minilm_onnx["onnx-fp32"].parent), "--output", str(output), "--log-level", "WARNING",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert benchmark.main(argv) == 0
    return json.loads(output.read_text()), output


def test_json_has_the_expected_keys(tiny_run):
    result, _ = tiny_run
    assert result["schema_version"] == benchmark.SCHEMA_VERSION
    assert result["complete"] is True
    env = result["environment"]
    for key in ("device", "device_name", "torch", "transformers", "sentence_transformers", "triton", "git_commit",
                "timestamp"):
        assert key in env
    assert env["device"] == "cpu"
    settings = result["settings"]
    assert settings["dtype"] == "fp32" and settings["lengths"] == [128] and settings["impls"] == ["chunk", "triton"]
    assert settings["tokens_per_batch"] == 128
    assert set(result) >= {"forward", "op", "encode", "documents"}


def test_forward_throughputs_are_positive(tiny_run):
    (row,) = tiny_run[0]["forward"]
    assert (row["length"], row["batch_size"], row["tokens"]) == (128, 1, 128)
    for record in (row["minilm"], row["lam"]["chunk"]):
        assert record["status"] == "ok"
        assert record["tokens_per_s"] > 0 and record["median_s"] > 0
        assert len(record["times_s"]) == 1
        assert record["peak_memory_mib"] is None  # CPU: no device memory counter
    assert row["ratio"]["chunk"] == pytest.approx(row["lam"]["chunk"]["tokens_per_s"] / row["minilm"]["tokens_per_s"])
    # The fused kernel runs on CUDA only: recorded, not raised.
    assert row["lam"]["triton"]["status"] == "unavailable"
    assert row["ratio"]["triton"] is None


def test_op_and_encode_figures(tiny_run):
    result = tiny_run[0]
    (op,) = result["op"]
    assert (op["heads"], op["head_dim"]) == (12, 32)
    assert op["lam"]["chunk"]["status"] == "ok" and op["lam"]["chunk"]["ms_per_call"] > 0
    assert op["sdpa"]["status"] == "ok" and op["sdpa"]["ms_per_call"] > 0
    assert op["fla_chunk_delta_rule"]["status"] == "unavailable"  # fla is CUDA only
    enc = result["encode"]
    assert enc["num_sentences"] == 6 and enc["batch_size"] == 4
    assert enc["minilm"]["sentences_per_s"] > 0
    assert enc["lam"]["chunk"]["sentences_per_s"] > 0
    assert enc["ratio"]["chunk"] > 0
    for peer in ("onnx-fp32", "onnx-int8"):  # MiniLM in ONNX Runtime, beside the others
        assert enc["peers"][peer]["sentences_per_s"] > 0
        assert enc["ratio"][peer] == pytest.approx(enc["peers"][peer]["sentences_per_s"] / enc["minilm"]["sentences_per_s"])
    # Every row's STS-B test Spearman (all 4 tiny pairs); fp32 ONNX gives MiniLM's own embeddings.
    stsb = enc["stsb_test_spearman"]
    assert set(stsb) == {"minilm", "onnx-fp32", "onnx-int8", "chunk"}  # triton: not on CPU
    assert stsb["onnx-fp32"] == pytest.approx(stsb["minilm"], abs=1e-9)


def test_documents_figures(tiny_run):
    """LAM's one pass and MiniLM's chunk-mean (PyTorch and ONNX Runtime) over the same two
    documents of 60 tokens (the short article passed over), 512-token chunks: one each."""
    docs = tiny_run[0]["documents"]
    assert docs["num_documents"] == 2 and docs["tokens_per_document"] == 60 and docs["chunks_per_document"] == 1
    for record in (docs["minilm"], docs["lam"]["chunk"], *docs["peers"].values()):
        assert record["status"] == "ok" and record["documents_per_s"] > 0
    assert set(docs["peers"]) == {"onnx-fp32", "onnx-int8"}
    assert docs["ratio"]["chunk"] == pytest.approx(docs["lam"]["chunk"]["documents_per_s"]
                                                   / docs["minilm"]["documents_per_s"])
    assert docs["lam"]["triton"]["status"] == "unavailable"
    assert "documents of 60 tokens" in benchmark.format_tables(tiny_run[0])


def test_documents_need_enough_long_articles(tmp_path):
    """Fewer long articles than --documents asks for: the section says so, the run still ends."""
    output = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--sections", "documents", "--impls", "chunk", "--documents", "3",
            "--document-tokens", "60", "--articles", str(_write_tiny_articles(tmp_path)), "--no-onnx-peers",
            "--output", str(output), "--log-level", "ERROR"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert benchmark.main(argv) == 0
    docs = json.loads(output.read_text())["documents"]
    assert docs["status"] == "unavailable" and "only 2 texts reach 60 tokens" in docs["reason"]


def test_the_table_shows_the_peers_and_stsb(tiny_run):
    text = benchmark.format_tables(tiny_run[0])
    assert "MiniLM onnx-int8" in text and "STS-B test" in text


def test_encode_rounds_pool_every_timed_call(tmp_path):
    """--encode-rounds 2: both rounds' calls of each model enter its median, and the ratio
    is that of the pooled figures."""
    stsb = _write_tiny_stsb(tmp_path)
    output = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--sections", "encode", "--repeats", "2", "--warmup", "1", "--impls", "chunk",
            "--sentences", "4", "--batch-size", "4", "--encode-rounds", "2", "--stsb", str(stsb),
            "--no-onnx-peers", "--output", str(output), "--log-level", "WARNING"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert benchmark.main(argv) == 0
    enc = json.loads(output.read_text())["encode"]
    assert enc["rounds"] == 2
    for record in (enc["minilm"], enc["lam"]["chunk"]):
        assert record["rounds"] == 2 and len(record["times_s"]) == 4
        assert record["median_s"] == pytest.approx(statistics.median(record["times_s"]))
    assert enc["ratio"]["chunk"] == pytest.approx(enc["lam"]["chunk"]["sentences_per_s"] / enc["minilm"]["sentences_per_s"])


def test_table_is_printed(tiny_run):
    text = benchmark.format_tables(tiny_run[0])
    assert "Forward, tokens/s" in text and "LAM chunk" in text and "MiniLM" in text
    assert "n/a" in text  # triton and fla on CPU


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--impls", "naive"], "unknown delta_impl 'naive'"),
        (["--impls", "fast"], "unknown delta_impl 'fast'"),
        (["--lengths", "0"], "must be a positive integer"),
        (["--lengths", "128", "-5"], "must be a positive integer"),
        (["--lengths", "long"], "is not an integer"),
        (["--repeats", "0"], "must be a positive integer"),
        (["--cpu-tokens", "-1"], "must be a positive integer"),
        (["--sections", "train"], "invalid choice"),
        (["--dtype", "fp8"], "invalid choice"),
        (["--sections", "documents", "--articles", "/nonexistent.jsonl"], "--articles: no file /nonexistent.jsonl"),
        (["--documents", "0"], "must be a positive integer"),
    ],
)
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(["--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_defaults(tmp_path):
    articles = tmp_path / "articles.jsonl"  # the documents section's file, wherever the data folder is
    articles.write_text('{"text": "an article"}\n')
    args = benchmark.parse_args(["--device", "cpu", "--articles", str(articles)])
    assert args.lengths == list(benchmark.CPU_LENGTHS)
    assert args.tokens_per_batch == benchmark.CPU_TOKENS
    assert args.dtype == "fp32" and args.repeats == benchmark.CPU_REPEATS
    assert "triton" not in args.impls and "naive" not in args.impls
    assert args.impls[:2] == ["auto", "auto-padded"]  # packed batches, and what packing saves
    assert args.documents == benchmark.CPU_DOCUMENTS


def test_default_output_names_the_device():
    assert str(benchmark.default_output(torch.device("cpu"))).endswith("benchmark-cpu.json")


def _measure(setup, budget=0.0):
    return benchmark.measure(setup, device=torch.device("cpu"), warmup=1, repeats=2,
                             clock=benchmark.Clock(budget), label="test")


def test_measure_records_oom_and_missing_impls_instead_of_raising():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def cpu_oom():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    def missing():
        raise NotImplementedError("no kernel")

    assert _measure(oom)["status"] == "OOM"
    assert _measure(lambda: cpu_oom)["status"] == "OOM"  # raised inside a call, not in setup
    assert _measure(missing) == {"status": "unavailable", "reason": "no kernel"}
    assert _measure(lambda: (lambda: 1 / 0))["status"] == "error"


def test_measure_times_calls_and_respects_the_budget():
    calls = []
    record = _measure(lambda: (lambda: calls.append(1)))
    assert record["status"] == "ok" and len(calls) == 3  # 1 warm-up + 2 timed
    assert len(record["times_s"]) == 2 and record["median_s"] >= 0
    clock = benchmark.Clock(1e-9)
    assert benchmark.measure(lambda: (lambda: None), device=torch.device("cpu"), warmup=0, repeats=1, clock=clock,
                             label="late")["status"] == "skipped"


def test_minilm_position_table_is_tiled():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=4)
    base = BertModel(config, add_pooling_layer=False).eval()
    assert benchmark.minilm_for_length(base, 4) is base
    tiled = benchmark.minilm_for_length(base, 10)
    table = tiled.embeddings.position_embeddings.weight
    original = base.embeddings.position_embeddings.weight
    assert table.shape == (10, 8)
    assert tiled.config._attn_implementation == base.config._attn_implementation
    assert torch.equal(table[:4], original) and torch.equal(table[4:8], original) and torch.equal(table[8:], original[:2])
    ids = torch.randint(0, 50, (2, 10))
    assert tiled(input_ids=ids).last_hidden_state.shape == (2, 10, 8)


def test_idle_gaps_between_kernels():
    from lam_embed.evaluation.profile_forward import idle_gaps

    # b overlaps a, d runs inside c: the idle stretches are a/b -> c and c -> e only.
    kernels = [(10.0, 20.0, "c"), (0.0, 5.0, "a"), (4.0, 7.0, "b"), (12.0, 15.0, "d"), (30.0, 31.0, "e")]
    total, gaps = idle_gaps(kernels)
    assert total == 13.0
    assert gaps == [(10.0, "c", "e"), (3.0, "b", "c")]
    assert idle_gaps(kernels, top=1)[1] == [(10.0, "c", "e")]
    assert idle_gaps([]) == (0.0, [])


@pytest.mark.parametrize("stsb, message", [
    ("/nonexistent/stsb", "--stsb '/nonexistent/stsb' is not a folder"),
    (".", "the folder holds no sts-test.csv"),
])
def test_a_bad_stsb_source_is_an_error_before_any_work(capsys, stsb, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--device", "cpu", "--sections", "encode", "--stsb", stsb])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
