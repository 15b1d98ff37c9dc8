"""The installed package, as a user gets it: a wheel built by ``pip wheel .`` carries the
released model and no top-level ``training``/``evaluation`` packages, and installed in a
virtual environment outside the repository, ``lam_embed.load()`` gives, offline, the same
embeddings as the repository's assembled model.

The environment is made with ``--system-site-packages`` so that torch, transformers and
sentence-transformers come from this machine instead of the network; lam_embed itself comes
from the wheel (the test checks where it was imported from).
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SENTENCES = ["A man is playing a guitar.", "The stock market fell sharply today.", "short"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True)
    (path,) = out.glob("lam_embed-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_carries_the_release_and_no_top_level_training_or_evaluation(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    release = REPO / "lam_embed" / "weights" / "lam-minilm-l6"
    for file in release.iterdir():
        assert f"lam_embed/weights/lam-minilm-l6/{file.name}" in names
    tops = {name.split("/")[0] for name in names}
    assert not tops & {"training", "evaluation", "tests", "scripts"}, tops
    assert "lam_embed/training/distill.py" in names and "lam_embed/evaluation/longdoc.py" in names
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for command in ("lam-assemble", "lam-distill", "lam-finetune", "lam-eval-stsb", "lam-eval-longdoc",
                    "lam-benchmark", "lam-benchmark-encode", "lam-encode-corpus"):
        assert command in entry_points


LOAD_AND_ENCODE = """
import json, sys
import lam_embed
model = lam_embed.load(device="cpu")
print(json.dumps({{"module": lam_embed.__file__, "path": str(lam_embed.model_path()),
                  "embeddings": model.encode({sentences}).tolist()}}))
"""


@pytest.mark.slow
def test_installed_wheel_loads_the_released_model_offline(wheel, tmp_path):
    from sentence_transformers import SentenceTransformer

    from lam_embed.release import RELEASED, assemble

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, text=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", LAM_EMBED_CACHE=str(tmp_path / "cache"))
    env.pop("PYTHONPATH", None)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    runs = []
    for _ in range(2):  # the second run reuses the assembled folder
        done = subprocess.run([str(python), "-c", LOAD_AND_ENCODE.format(sentences=SENTENCES)], cwd=outside, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["module"].startswith(str(venv)), runs[0]["module"]
    assert runs[0]["path"].startswith(str(tmp_path / "cache"))
    assert runs[0] == runs[1]

    folder = assemble(RELEASED, tmp_path / "lam")  # as the README's assemble command builds it
    want = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES)
    np.testing.assert_array_equal(np.asarray(runs[0]["embeddings"], dtype=np.float32), want)
