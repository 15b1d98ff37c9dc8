"""Regression test of the shipped weights: the assembled `lam` model on STS-B test."""

import json
from pathlib import Path

import pytest

from lam_embed.data import resolve_stsb_source
from lam_embed.release import MANIFEST_FILE, WEIGHTS_FILE, assemble, load_release

RELEASE = Path(__file__).resolve().parent.parent / "weights" / "lam-minilm-l6"


def test_release_files_are_compact():
    files = [f for f in RELEASE.iterdir() if f.is_file()]
    assert (RELEASE / WEIGHTS_FILE).is_file() and (RELEASE / MANIFEST_FILE).is_file()
    assert all(f.stat().st_size <= 15 * 2**20 for f in files)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    manifest = json.loads((RELEASE / MANIFEST_FILE).read_text())
    for key in ("command", "commit", "device", "train_minutes", "data", "figures"):
        assert key in manifest, key


def test_release_rejects_a_foreign_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_release(tmp_path)


@pytest.mark.slow
def test_released_lam_on_stsb_test(tmp_path):
    if not Path(resolve_stsb_source()).is_dir():
        pytest.skip("the STS-B csv folder is not available (set LAM_DATA_DIR or LAM_STSB)")
    from sentence_transformers import SentenceTransformer

    from evaluation.stsb import evaluate_stsb

    assemble(RELEASE, tmp_path / "lam")
    model = SentenceTransformer(str(tmp_path / "lam"), device="cpu")
    figures = evaluate_stsb(model, splits=("test",), batch_size=64)
    # The released weights measured 0.8206 here (manifest.json), the teacher 0.8203; the
    # project's target is 0.82, so a change to the model code or the weights that costs
    # more than 0.0006 fails.
    assert figures["test"]["spearman"] >= 0.82
