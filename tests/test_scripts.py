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
