"""Command-line scripts that are thin wrappers: their errors name the cause and exit non-zero."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_long_input_memory_reports_its_childs_error():
    done = run_script("scripts/long_input_memory.py", "--lengths", "8", "--impl", "triton")
    assert done.returncode != 0
    assert "the run of 8 tokens with --impl triton failed" in done.stderr
    assert "runs on CUDA tensors only" in done.stderr  # the child's own message


def test_long_input_memory_rejects_bad_options_before_running():
    done = run_script("scripts/long_input_memory.py", "--impl", "fast")
    assert done.returncode == 2 and "invalid choice: 'fast'" in done.stderr
    done = run_script("scripts/long_input_memory.py", "--lengths", "0")
    assert done.returncode == 2 and "--lengths must be positive" in done.stderr


def test_streaming_benchmark_end_to_end(tmp_path):
    """A tiny run of scripts/streaming_benchmark.py on a small LAM with a token repeat cap (as
    the released one): streamed equals one pass, an append equals encoding the grown document
    again, and every section reports."""
    import json

    from conftest import small_lam_sentence_transformer

    model, _ = small_lam_sentence_transformer(delta_net_noise=0.05, chunk_size=16, token_repeat_cap=2)
    model.save(str(tmp_path / "model"))
    out = tmp_path / "streaming.json"
    done = run_script("scripts/streaming_benchmark.py", "--model", str(tmp_path / "model"), "--lengths", "300",
                      "--segment-tokens", "64", "--append-base", "200", "--append-tokens", "20", "--append-repeats",
                      "2", "--exactness-lengths", "1", "150", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["tokens"] for row in result["exactness"]["documents"]] == [1, 150]
    # float32 rounding of pieces against one pass: within 1e-5 of the hidden states' scale.
    assert all(row["max_abs_hidden"] <= 1e-5 * row["hidden_scale"] for row in result["exactness"]["documents"])
    assert all(row["max_abs_embedding"] <= 1e-6 for row in result["exactness"]["documents"])
    assert result["lengths"][0]["tokens"] >= 300 and result["lengths"][0]["peak_rss_mib"] > 0
    append = result["append"]
    assert append["appends"] == 2 and append["max_abs_difference"] <= 1e-6
    assert append["one_pass_seconds"] > 0 and append["ratio_to_one_pass"] > 0
    assert result["provenance"]["command"].startswith("python scripts/streaming_benchmark.py")


def test_streaming_benchmark_rejects_bad_options_before_running():
    done = run_script("scripts/streaming_benchmark.py", "--append-repeats", "0")
    assert done.returncode == 2 and "--append-repeats >= 1" in done.stderr
    done = run_script("scripts/streaming_benchmark.py", "--one-pass-repeats", "-1")
    assert done.returncode == 2 and "--one-pass-repeats >= 0" in done.stderr
