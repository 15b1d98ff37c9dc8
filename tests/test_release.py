"""Regression test of the shipped weights: the assembled `lam` model on STS-B test."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lam_embed import LAMConfig, LAMModel
from lam_embed.data import resolve_stsb_source
from lam_embed.release import MANIFEST_FILE, WEIGHTS_FILE, assemble, average_releases, load_release, save_release

from lam_embed.release import RELEASED as RELEASE  # noqa: E402


def test_release_files_are_compact():
    files = [f for f in RELEASE.iterdir() if f.is_file()]
    assert (RELEASE / WEIGHTS_FILE).is_file() and (RELEASE / MANIFEST_FILE).is_file()
    assert all(f.stat().st_size <= 15 * 2**20 for f in files)
    # Two sets of layers (those for inputs of up to 256 tokens and those for longer ones;
    # each the DeltaNets and the feed-forward layers) in fp16: 44.9 MiB; the embeddings stay
    # the teacher's.
    assert sum(f.stat().st_size for f in files) <= 46 * 2**20
    assert not any(name.startswith("embeddings.") for name in _release_tensors(RELEASE))
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

    from lam_embed.evaluation.stsb import evaluate_stsb

    assemble(RELEASE, tmp_path / "lam")
    model = SentenceTransformer(str(tmp_path / "lam"), device="cpu")
    figures = evaluate_stsb(model, splits=("test",), batch_size=64)
    # The released weights measured 0.8204 here (manifest.json), the teacher 0.8203; the
    # project's target is 0.82, so a change to the model code or the weights that costs
    # more than 0.0004 fails.
    assert figures["test"]["spearman"] >= 0.82


@pytest.mark.slow
def test_released_lam_finds_passkeys_in_one_pass(tmp_path):
    """A small long-document check of the shipped weights on CPU: the benchmark's passkey
    task at 512 and 2,048 tokens (30 documents, 15 queries each), one pass per document.
    The released model found 15/15 and 14/15 here (the same with a token repeat cap of 2,
    and the release with one set of layers; 13/15 at 2,048 before outlier pooling), the
    distilled model before the long-document stage 6/15 and 10/15; fewer than 12 at either
    length fails."""
    from sentence_transformers import SentenceTransformer

    from lam_embed.evaluation.longdoc import evaluate_model, passkey_task

    assemble(RELEASE, tmp_path / "lam")
    model = SentenceTransformer(str(tmp_path / "lam"), device="cpu")
    tasks = [passkey_task(length, documents=30, queries=15, seed=7) for length in (512, 2048)]
    results = evaluate_model(model, tasks, ["full"], warm_passes=0)["full"]
    for task in tasks:
        assert results[task.name]["score"] >= 12 / 15, (task.name, results[task.name]["score"])


@pytest.mark.slow
def test_released_lam_finds_needles_in_one_pass(tmp_path):
    """The needle task at 512, 1,024 and 2,048 tokens (30 documents, 15 queries each) on CPU:
    the shipped model finds 15/15, 15/15 and 14/15 here (with a token repeat cap of 2: 15/15,
    14/15 and 14/15), the release before it (one set of layers) 15/15, 13/15 and 12/15; that
    one with outlier pooling from 512 tokens on instead of 256 found 9/15 at 512 tokens, the
    weights before its second long-document stage 12/15 and 10/15 at 1k and 2k, and without
    outlier pooling 8/15 and 2/15. Fewer than 12 at 512 tokens or 9 at 1k or 2k fails."""
    from sentence_transformers import SentenceTransformer

    from lam_embed.data import default_data_dir
    from lam_embed.evaluation.longdoc import evaluate_model, needle_task, read_haystack

    essays = (default_data_dir() or Path("/nonexistent")) / "longdoc" / "pg_essays.jsonl.gz"
    if not essays.is_file():
        pytest.skip("the needle haystack is not available (set LAM_DATA_DIR)")
    assemble(RELEASE, tmp_path / "lam")
    model = SentenceTransformer(str(tmp_path / "lam"), device="cpu")
    haystack = read_haystack(essays)
    least_found = {512: 12, 1024: 9, 2048: 9}
    tasks = {length: needle_task(haystack, length, documents=30, queries=15, seed=7) for length in least_found}
    results = evaluate_model(model, list(tasks.values()), ["full"], warm_passes=0)["full"]
    for length, task in tasks.items():
        assert results[task.name]["score"] >= least_found[length] / 15, (task.name, results[task.name]["score"])


def _perturbed_release(folder, seed, also=(), scale=0.01, one_set=False):
    """The shipped model with its DeltaNet tensors (and those whose names start with one
    of ``also``) moved by seeded noise, saved as a release; with ``one_set``, without its
    long-input layers."""
    model = load_release(RELEASE)
    if one_set:
        config = model.config.to_dict()
        config.pop("model_type", None)
        tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("long_input_layers.")}
        model = LAMModel(LAMConfig(**{**config, "long_input_min_tokens": None}))
        model.load_state_dict(tensors)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".delta_net." in name or name.startswith(tuple(also)):
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    return save_release(model, folder, {"command": f"perturbed {seed}", "train_minutes": 1.5, "device": "cpu"})


def _release_tensors(folder):
    tensors = {}
    for shard in sorted(Path(folder).glob("lam_weights*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_average_of_two_releases_is_the_weighted_mean_of_their_tensors(tmp_path):
    # Only b trains the last FFN, as when a run with --train-ffn-layers meets one without.
    a, b = _perturbed_release(tmp_path / "a", 0), _perturbed_release(tmp_path / "b", 1, also=["layers.5.ffn_in."])
    average_releases([a, b], tmp_path / "avg", weights=[0.3, 0.7])
    ta, tb, tavg = _release_tensors(a), _release_tensors(b), _release_tensors(tmp_path / "avg")
    teacher_ffn = dict(load_release(RELEASE).named_parameters())
    # The union of what the runs ship: the teacher's embeddings and other FFNs stay out ...
    assert set(tavg) == set(tb) == set(ta) | {"layers.5.ffn_in.weight", "layers.5.ffn_in.bias"}
    for name, value in tavg.items():
        first = ta[name].float() if name in ta else teacher_ffn[name].detach()
        expected = (0.3 * first + 0.7 * tb[name].float()).half()
        assert torch.equal(value, expected), name
    assert not torch.equal(tavg["layers.0.delta_net.q_proj.weight"], ta["layers.0.delta_net.q_proj.weight"])
    # ... and it loads as a model of its own.
    assert load_release(tmp_path / "avg").config.num_hidden_layers == 6


def test_average_with_all_weight_on_one_release_gives_that_release(tmp_path):
    a, b = _perturbed_release(tmp_path / "a", 0), _perturbed_release(tmp_path / "b", 1)
    average_releases([a, b], tmp_path / "avg", weights=[0.0, 1.0], manifest={"command": "x"})
    tb, tavg = _release_tensors(b), _release_tensors(tmp_path / "avg")
    assert set(tavg) == set(tb) and all(torch.equal(tavg[k], tb[k]) for k in tb)
    manifest = json.loads((tmp_path / "avg" / MANIFEST_FILE).read_text())
    assert manifest["command"] == "x" and [r["weight"] for r in manifest["averaged"]] == [0.0, 1.0]


@pytest.mark.parametrize(
    "folders, weights, message",
    [
        (["a"], None, "folders: expected at least two"),
        (["a", "b"], [1.0], "weights: expected one weight per folder"),
        (["a", "b"], [0.5, 0.6], "weights: expected non-negative numbers that sum to 1"),
        (["a", "b"], [1.5, -0.5], "weights: expected non-negative numbers that sum to 1"),
    ],
)
def test_average_rejects_bad_arguments(tmp_path, folders, weights, message):
    with pytest.raises(ValueError, match=message):
        average_releases([tmp_path / f for f in folders], tmp_path / "avg", weights=weights)


def test_average_rejects_releases_of_another_architecture(tmp_path):
    a = _perturbed_release(tmp_path / "a", 0)
    config = json.loads((a / "config.json").read_text())
    config["chunk_size"] = 64  # same tensors, another model
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    for shard in a.glob("lam_weights*.safetensors"):
        (other / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(ValueError, match="another architecture than .*chunk_size"):
        average_releases([a, other], tmp_path / "avg")


def _script_main(name):
    """The main function of scripts/<name>.py."""
    import importlib.util

    script_path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main


def test_average_releases_cli_writes_the_runs_manifests(tmp_path):
    main = _script_main("average_releases")
    a, b = _perturbed_release(tmp_path / "a", 0), _perturbed_release(tmp_path / "b", 1)
    main([str(a), str(b), "--output", str(tmp_path / "avg")])
    manifest = json.loads((tmp_path / "avg" / MANIFEST_FILE).read_text())
    assert manifest["command"].startswith("python scripts/average_releases.py")
    assert [run["command"] for run in manifest["runs"]] == ["perturbed 0", "perturbed 1"]
    assert manifest["train_minutes"] == 3.0
    with pytest.raises(SystemExit):
        main([str(a), "--output", str(tmp_path / "avg2")])


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assembled") / "lam"
    assemble(RELEASE, folder)
    return folder


def test_assembled_folder_has_vocab_and_checksums(assembled):
    assert (assembled / "vocab.txt").is_file() and (assembled / "tokenizer.json").is_file()
    from lam_embed.checksums import file_sha256

    checksums = json.loads((assembled / "lam_checksums.json").read_text())
    assert checksums == {"model.safetensors": file_sha256(assembled / "model.safetensors")}


def test_without_tokenizer_json_the_vocabulary_gives_the_same_embeddings(assembled, tmp_path):
    import shutil

    from sentence_transformers import SentenceTransformer

    copy = tmp_path / "copy"
    shutil.copytree(assembled, copy)
    (copy / "tokenizer.json").unlink()
    texts = ["A man is playing a guitar.", "Unusual words: photosynthesis, Reykjavik, 1987."]
    whole = SentenceTransformer(str(assembled), device="cpu").encode(texts)
    fallback = SentenceTransformer(str(copy), device="cpu")
    assert len(fallback.tokenizer) == 30522
    assert abs(fallback.encode(texts) - whole).max() <= 1e-6


def test_damaged_weights_are_an_error_naming_the_file(assembled, tmp_path):
    import shutil

    from sentence_transformers import SentenceTransformer

    copy = tmp_path / "copy"
    shutil.copytree(assembled, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors is damaged or was changed"):
        SentenceTransformer(str(copy), device="cpu")


def test_damaged_release_shard_is_an_error_naming_it(tmp_path):
    import shutil

    copy = tmp_path / "release"
    shutil.copytree(RELEASE, copy)
    shard = copy / WEIGHTS_FILE
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE} is damaged or was changed"):
        load_release(copy)


def test_a_built_model_saves_the_card_of_its_manifest(tmp_path):
    """build_sentence_transformer(manifest=...): st.save() writes LAM's card; without a
    manifest (a model LAM has not trained) sentence-transformers' own."""
    from conftest import small_lam_sentence_transformer

    from lam_embed import build_sentence_transformer

    model, teacher = small_lam_sentence_transformer()
    lam = model[0].auto_model
    manifest = {"figures": {"stsb_cpu_fp32": {"dev_spearman": 0.5, "test_spearman": 0.25}}, "command": "python x.py"}
    build_sentence_transformer(lam, teacher, manifest=manifest).save(str(tmp_path / "with"))
    card = (tmp_path / "with" / "README.md").read_text()
    assert "# LAM: a linear-time sentence encoder" in card and "| LAM | 50.00 | 25.00 |" in card
    assert "`python x.py`" in card
    build_sentence_transformer(lam, teacher).save(str(tmp_path / "without"))
    assert "# LAM:" not in (tmp_path / "without" / "README.md").read_text()


def test_assembled_folder_has_a_model_card_with_figures_and_loading_lines(assembled):
    card = (assembled / "README.md").read_text()
    manifest = json.loads((RELEASE / MANIFEST_FILE).read_text())
    assert card.startswith("---\n") and "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "# LAM: a linear-time sentence encoder" in card
    assert "import lam_embed" in card and "SentenceTransformer(" in card
    assert f"| LAM | {100 * manifest['figures']['stsb_cpu_fp32']['dev_spearman']:.2f} | " \
           f"{100 * manifest['figures']['stsb_cpu_fp32']['test_spearman']:.2f} |" in card
    assert "| all-MiniLM-L6-v2 (teacher) | 86.72 | 82.03 |" in card
    speed = manifest["figures"]["speed"]["forward_tokens_per_s"]["32768"]
    assert f"| 32768 | {speed['teacher'] / 1e6:.2f}M | {speed['lam'] / 1e6:.2f}M |" in card
    assert "trust_remote_code=True" in card and "lam_embed.load()" in card
    assert "sentence_transformers_model_id" not in card  # not the generic template
    assert (f"Inputs of more than {manifest['long_input_min_tokens']} tokens are read by a second set of layers"
            in card)
    assert manifest["token_repeat_cap"] == 1 and "no token id weighs more than 1 occurrence (" in card
    assert f"exp(-{manifest['outlier_pooling_temperature']:g} cos(token, mean))" in card


def test_set_release_pooling_changes_the_config_and_manifest_only(tmp_path):
    """lam-release-pooling: the weights are copied byte for byte, the config and the manifest
    carry the new setting and the command, and the assembled model pools long inputs with it
    (short ones unchanged)."""
    from sentence_transformers import SentenceTransformer

    from lam_embed.release import pooling_main

    out = tmp_path / "release"
    pooling_main([str(RELEASE), "--output", str(out), "--outlier-pooling-temperature", "6",
                  "--outlier-pooling-min-tokens", "16"])
    for shard in RELEASE.glob("lam_weights*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["outlier_pooling_temperature"] == 6.0 and config["outlier_pooling_min_tokens"] == 16
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["outlier_pooling_temperature"] == 6.0
    assert manifest["command"][-1].startswith("python scripts/set_release_pooling.py")
    assert manifest["checksums"] == json.loads((RELEASE / MANIFEST_FILE).read_text())["checksums"]
    texts = ["A short sentence.", " ".join(["the river ran below the old road"] * 12) + " seven blue lamps"]
    shipped = SentenceTransformer(str(assemble(RELEASE, tmp_path / "shipped")), device="cpu").encode(texts)
    changed = SentenceTransformer(str(assemble(out, tmp_path / "changed")), device="cpu").encode(texts)
    assert (shipped[0] == changed[0]).all()  # under 16 tokens: as before
    assert abs(shipped[1] - changed[1]).max() > 1e-3
    # In place, and back off.
    pooling_main([str(out), "--output", str(out), "--outlier-pooling-temperature", "none"])
    assert json.loads((out / "config.json").read_text())["outlier_pooling_temperature"] is None


def test_set_release_pooling_rejects_bad_settings(tmp_path, capsys):
    from lam_embed.release import pooling_main, set_release_pooling

    with pytest.raises(ValueError, match=r"only .* can be set without training, got \['chunk_size'\]"):
        set_release_pooling(RELEASE, tmp_path / "x", {"chunk_size": 64})
    with pytest.raises(ValueError, match="LAMConfig.token_repeat_cap must be None or a positive integer, got 0.5"):
        set_release_pooling(RELEASE, tmp_path / "x", {"token_repeat_cap": 0.5})
    assert not (tmp_path / "x").exists()  # nothing written before the checks
    for argv, message in [
        (["--outlier-pooling-temperature", "-1"], "expected a positive float or none, got '-1'"),
        (["--outlier-pooling-min-tokens", "none"], "expected a positive int, got 'none'"),
        ([], "nothing to set"),
    ]:
        with pytest.raises(SystemExit):
            pooling_main([str(RELEASE), "--output", str(tmp_path / "y"), *argv])
        assert message in capsys.readouterr().err


def test_add_long_input_layers_routes_inputs_by_length(tmp_path):
    from lam_embed.release import add_long_input_layers

    a, b = (_perturbed_release(tmp_path / name, seed, scale=scale, one_set=True)
            for name, seed, scale in (("a", 0, 0.01), ("b", 1, 0.05)))
    out = add_long_input_layers(a, b, 16, tmp_path / "routed", manifest={"command": "x"})
    routed, short, long_ = load_release(out), load_release(a), load_release(b)
    assert routed.config.long_input_min_tokens == 16
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [run["command"] for run in manifest["runs"]] == ["perturbed 0", "perturbed 1"]
    assert manifest["long_input_min_tokens"] == 16 and manifest["train_minutes"] == 3.0
    generator = torch.Generator().manual_seed(0)
    for n, want in ((10, short), (40, long_)):
        ids = torch.randint(1000, 20000, (1, n), generator=generator)
        with torch.no_grad():
            got = routed(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got, want(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has long-input layers already"):
        add_long_input_layers(out, b, 16, tmp_path / "again")
    c = _perturbed_release(tmp_path / "c", 2, also=["embeddings.LayerNorm"], one_set=True)
    with pytest.raises(ValueError, match="outside its layers .*embeddings.LayerNorm"):
        add_long_input_layers(a, c, 16, tmp_path / "bad")


def test_add_long_input_layers_cli_names_bad_arguments(tmp_path, capsys):
    main = _script_main("add_long_input_layers")
    for extra, message in ((["--min-tokens", "-1"], "--min-tokens: must be an integer >= 0, got -1"),
                           (["--long-input-release", str(tmp_path / "none")], "lacks lam_weights.safetensors")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(RELEASE), "--output", str(tmp_path / "out"), "--long-input-release", str(RELEASE), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
