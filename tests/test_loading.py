"""How a LAM folder loads: with ``import lam_embed``, with ``trust_remote_code=True`` and no
import (the folder's auto_map and its two import files), the errors when neither applies or
lam_embed is missing; and ``lam_embed.model_path()``/``load()``, which assemble the released
model into a cache once and verify it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SENTENCES = ["A man is playing a guitar.", "short"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import small_lam_sentence_transformer

    model, _ = small_lam_sentence_transformer(delta_net_noise=0.05)
    folder = tmp_path_factory.mktemp("saved") / "lam-small"
    model.save(str(folder))
    return folder, model.encode(SENTENCES)


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_saved_folder_carries_the_auto_map_and_its_import_files(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_lam.LAMConfig", "AutoModel": "modeling_lam.LAMModel"}
    for name in ("configuration_lam.py", "modeling_lam.py"):
        text = (folder / name).read_text()
        assert "from lam_embed." in text and "pip install lam_embed" in text


def test_trust_remote_code_loads_without_the_import(saved, tmp_path):
    folder, want = saved
    code = f"""
import json, sys
from sentence_transformers import SentenceTransformer
assert "lam_embed" not in sys.modules
model = SentenceTransformer({str(folder)!r}, device="cpu", trust_remote_code=True)
print(json.dumps(model.encode({SENTENCES!r}).tolist()))
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.asarray(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_array_equal(got, want)


def test_import_loads_without_trust_remote_code(saved, tmp_path):
    folder, want = saved
    code = f"""
import json
import lam_embed
from sentence_transformers import SentenceTransformer
print(json.dumps(SentenceTransformer({str(folder)!r}, device="cpu").encode({SENTENCES!r}).tolist()))
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(np.asarray(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32), want)


def test_without_import_or_trust_the_error_asks_for_trust_remote_code(saved, tmp_path):
    """transformers' own message: the folder holds code; pass trust_remote_code=True (that code
    then names lam_embed, see the next test)."""
    folder, _ = saved
    done = run_python(f"from sentence_transformers import SentenceTransformer; "
                      f"SentenceTransformer({str(folder)!r}, device='cpu')", tmp_path)
    assert done.returncode != 0 and "trust_remote_code=True" in done.stderr


def test_trust_remote_code_without_lam_embed_names_the_package(saved, tmp_path):
    folder, _ = saved
    code = f"""
import sys

class NotInstalled:  # imports of lam_embed fail as they do where it is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lam_embed":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
from sentence_transformers import SentenceTransformer
SentenceTransformer({str(folder)!r}, device="cpu", trust_remote_code=True)
"""
    done = run_python(code, tmp_path)
    assert done.returncode != 0 and "pip install lam_embed" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_model_path_assembles_once_and_a_damaged_cache_is_named(tmp_path, monkeypatch):
    import lam_embed
    from lam_embed import release

    try:
        lam_embed.resolve_teacher_path()
    except RuntimeError as err:
        pytest.skip(f"teacher not available: {err}")
    folder = lam_embed.model_path(cache_dir=tmp_path)
    assert folder.parent == tmp_path and (folder / release.CHECKSUMS_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no scratch folder left

    def no_second_assembly(*args, **kwargs):
        raise AssertionError("assembled again")

    monkeypatch.setattr(release, "assemble", no_second_assembly)
    assert lam_embed.model_path(cache_dir=tmp_path) == folder
    first = lam_embed.load(device="cpu", cache_dir=tmp_path).encode(SENTENCES)
    assert first.shape == (2, 384)

    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=weights.name):
        lam_embed.load(device="cpu", cache_dir=tmp_path)
