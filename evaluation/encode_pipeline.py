"""End-to-end encoding of real text, text in and embeddings out: LAM and all-MiniLM-L6-v2
side by side on three sets (short sentences, ~250-token passages, multi-thousand-token
Wikipedia articles), each measured as the first call of a fresh process and warmed up, with
the LAM forward's tokens/s on the same batches for reference.

Rows per set:
- ``lam encode_texts``: ``lam_embed.encode_texts`` (fast tokenizer in background threads,
  token-budget batches, one transfer to the host);
- ``lam encode``: ``SentenceTransformer.encode`` at ``--batch-size``;
- ``minilm encode``: ``SentenceTransformer.encode`` at each of ``--minilm-batch-sizes``, the
  best kept (sentences and passages); for the articles, ``minilm chunk-mean``: the articles
  tokenized whole, cut into 512-token chunks, the chunk embeddings averaged per article
  (what MiniLM takes to cover them), tokenizing included;
- ``lam forward``: the LAM forward alone over the pre-tokenized batches of encode_texts;
- ``tokenize``: the tokenizer's Rust backend alone over all texts of the set at once (the
  most the fast path's tokenization can give; it runs on as many threads as
  ``TOKENIZERS_PARALLELISM`` allows, recorded with the figures).

Tokens are the valid tokens of the set (special tokens included, after truncation at the
model's limit); a set's figure is texts/s and tokens/s of the whole call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lam_embed.cli import DefaultsHelpFormatter

logger = logging.getLogger(__name__)

SETS = ("sentences", "passages", "documents")
SCHEMA = "lam-encode-pipeline/1"


def load_set(data_dir: Path, name: str, count: int) -> list[str]:
    """The first ``count`` corpus sentences or passages, or the first ``count`` articles."""
    import gzip
    import itertools

    from lam_embed.data import read_text_lines

    if name == "documents":
        with gzip.open(data_dir / "longdoc" / "wiki_articles.jsonl.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in itertools.islice(f, count)]
    return read_text_lines(data_dir / "corpus" / f"{name}.txt.gz", limit=count)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_mean(model, texts: list[str], batch_tokens: int, max_tokens: int) -> np.ndarray:
    """Each text's normalised mean of its normalised 512-token chunk embeddings, over its first
    ``max_tokens`` tokens (special tokens counted once), as LAM reads it."""
    from .longdoc import WINDOW, DocumentView, embed_sequences, tokenize, view_sequences

    ids = [x[: max_tokens - 2] for x in tokenize(model.tokenizer, texts)]
    chunks, owner = view_sequences(model.tokenizer, ids, DocumentView("chunks", WINDOW))
    embeddings = embed_sequences(model, chunks, batch_tokens, show_progress_bar=False)
    summed = np.zeros((len(texts), embeddings.shape[1]))
    np.add.at(summed, owner, embeddings)
    return summed / np.linalg.norm(summed, axis=1, keepdims=True)


def method_call(method: str, model, texts: list[str], args):
    """A function that runs ``method`` on ``texts`` once and returns the embeddings."""
    from lam_embed import encode_texts

    if method == "lam encode_texts":
        return lambda: encode_texts(model, texts, batch_tokens=args.batch_tokens, show_progress_bar=False,
                                    tokenizer_threads=args.tokenizer_threads,
                                    tokenizer_processes=args.tokenizer_processes)
    if method.startswith("lam encode") or method.startswith("minilm encode"):
        batch = int(method.rsplit("@", 1)[1])
        return lambda: model.encode(texts, batch_size=batch, show_progress_bar=False)
    if method == "minilm chunk-mean":
        return lambda: chunk_mean(model, texts, args.batch_tokens, args.document_tokens)
    raise ValueError(f"unknown method {method!r}")


def load_model(path: str, device: str, dtype: str, max_seq_length: int | None = None):
    import torch
    from sentence_transformers import SentenceTransformer

    import lam_embed  # noqa: F401  (registers LAM)

    model = SentenceTransformer(path, device=device)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model.eval()


def first_call(args, set_name: str, method: str, model_path: str, max_seq_length: int | None) -> float:
    """Seconds of ``method``'s first call in a fresh process (model loading not counted)."""
    command = [sys.executable, "-m", "lam_embed.evaluation.encode_pipeline", "--first-call", set_name, method,
               model_path, str(max_seq_length or 0), "--data-dir", str(args.data_dir), "--device", args.device,
               "--dtype", args.dtype, "--sentences", str(args.sentences), "--passages", str(args.passages),
               "--documents", str(args.documents), "--batch-tokens", str(args.batch_tokens),
               "--document-tokens", str(args.document_tokens)]
    if args.tokenizer_threads is not None:
        command += ["--tokenizer-threads", str(args.tokenizer_threads)]
    if args.tokenizer_processes is not None:
        command.append("--tokenizer-processes" if args.tokenizer_processes else "--no-tokenizer-processes")
    # PYTHONSAFEPATH (python -P): the working directory stays off sys.path, so that a source
    # checkout's lam_embed/ (it holds no evaluation/ package) does not shadow the installed one.
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"first call of {method} on {set_name} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _first_call_main(args) -> None:
    """The child of ``first_call``: load, run once, print the seconds."""
    import torch

    set_name, method, model_path, max_seq_length = args.first_call
    texts = load_set(Path(args.data_dir), set_name, getattr(args, set_name))
    model = load_model(model_path, args.device, args.dtype, int(max_seq_length) or None)
    call = method_call(method, model, texts, args)
    device = torch.device(args.device)
    with torch.inference_mode():
        start = time.perf_counter()
        call()
        synchronize(device)
    print(time.perf_counter() - start)


def warm_seconds(call, device, repeats: int):
    """The fastest of ``repeats`` calls after one untimed call, and the last call's result."""
    call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def forward_seconds(model, texts: list[str], ids: list[list[int]], batch_tokens: int, device, repeats: int) -> float:
    """The LAM forward alone over encode_texts' batches of ``texts`` (token ``ids`` given)."""
    from lam_embed.inference.pipeline import batch_features, module_features, token_budget_batches
    from lam_embed.inference.tokenization import TokenIds

    ids = TokenIds.from_lists(ids)
    template = module_features(model, texts[:1])
    batches = [batch_features(template, ids, batch, device)
               for batch in token_budget_batches(ids.lengths, batch_tokens, 1024)]

    def call():
        for features in batches:
            model(features)

    return warm_seconds(call, device, repeats)[0]


def run(args, save=lambda result: None) -> dict:
    """All rows of all sets; ``save(result)`` after each set."""
    import torch

    device = torch.device(args.device)
    sets = {name: load_set(Path(args.data_dir), name, getattr(args, name)) for name in SETS}
    lam = load_model(args.lam, args.device, args.dtype, args.document_tokens)
    minilm = load_model(args.minilm, args.device, args.dtype)
    result = {"schema": SCHEMA, "settings": {k: v for k, v in vars(args).items() if k != "first_call"},
              "minilm_attention": getattr(minilm[0].auto_model.config, "_attn_implementation", None),
              "host": {"cpu_count": os.cpu_count(), "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")},
              "sets": {}}
    for name in SETS:
        _run_set(args, name, sets[name], lam, minilm, device, result)
        save(result)
    return result


def _run_set(args, name: str, texts: list[str], lam, minilm, device, result: dict) -> None:
    """The rows of one set, into ``result["sets"][name]``."""
    import torch

    from lam_embed.inference.pipeline import FastTokenizer

    lam.max_seq_length = args.document_tokens if name == "documents" else 512
    methods = {"lam encode_texts": (lam, args.lam), f"lam encode@{args.batch_size}": (lam, args.lam)}
    if name == "documents":
        methods["minilm chunk-mean"] = (minilm, args.minilm)
    else:
        methods.update({f"minilm encode@{b}": (minilm, args.minilm) for b in args.minilm_batch_sizes})
    # Token ids as LAM reads them (special tokens included, cut at its limit).
    tokenize = FastTokenizer(lam.tokenizer, lam.max_seq_length)
    ids = tokenize(texts)
    tokens = sum(map(len, ids))
    entry = {"texts": len(texts), "tokens": tokens, "rows": {}}
    result["sets"][name] = entry
    reference = None
    # First calls (a fresh process each) of the fast path and of MiniLM at its largest batch.
    fresh = ["lam encode_texts", "minilm chunk-mean", f"minilm encode@{max(args.minilm_batch_sizes)}"]
    with torch.inference_mode():
        for method, (model, path) in methods.items():
            row = {}
            if args.fresh and method in fresh:
                row["first_call_s"] = first_call(args, name, method, path,
                                                 lam.max_seq_length if model is lam else None)
            call = method_call(method, model, texts, args)
            row["warm_s"], embeddings = warm_seconds(call, device, args.repeats)
            embeddings = np.asarray(embeddings, dtype=np.float32)
            if method.startswith("lam"):
                if reference is None:
                    reference = embeddings
                else:  # the plain path's against the fast path's
                    row["max_abs_diff_to_encode_texts"] = float(np.abs(embeddings - reference).max())
            for key in ("first_call_s", "warm_s"):
                if key in row:
                    row[key.replace("_s", "_texts_per_s")] = len(texts) / row[key]
                    row[key.replace("_s", "_tokens_per_s")] = tokens / row[key]
            entry["rows"][method] = row
            logger.info("%s %s: %s", name, method, {k: round(v, 4) for k, v in row.items()})
        entry["lam_forward_tokens_per_s"] = tokens / forward_seconds(lam, texts, ids, args.batch_tokens, device,
                                                                     args.repeats)
    # The backend built once, as encode_texts keeps it for a model.
    entry["tokenize_tokens_per_s"] = tokens / warm_seconds(lambda: tokenize(texts), device, args.repeats)[0]
    summarise(entry)


def summarise(entry: dict) -> None:
    """The ratios the figures are read by: LAM's fast path against its forward and against
    MiniLM's best row, first call and warm."""
    rows = entry["rows"]
    fast = rows["lam encode_texts"]
    minilm = [row for method, row in rows.items() if method.startswith("minilm")]
    for kind in ("first_call", "warm"):
        key = f"{kind}_tokens_per_s"
        if key in fast:
            entry[f"{kind}_share_of_forward"] = fast[key] / entry["lam_forward_tokens_per_s"]
            best = max((row[key] for row in minilm if key in row), default=None)
            if best:
                entry[f"{kind}_x_minilm_best"] = fast[key] / best


def format_table(result: dict) -> str:
    lines = ["| set | method | texts/s first call | texts/s warm | Mtokens/s first call | Mtokens/s warm |",
             "|---|---|---|---|---|---|"]
    for name, entry in result["sets"].items():
        for method, row in entry["rows"].items():
            cells = [f"{row[k]:,.0f}" if k in row else "-" for k in ("first_call_texts_per_s", "warm_texts_per_s")]
            cells += [f"{row[k] / 1e6:.2f}" if k in row else "-" for k in ("first_call_tokens_per_s", "warm_tokens_per_s")]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
        lines.append(f"| {name} | lam forward | | | | {entry['lam_forward_tokens_per_s'] / 1e6:.2f} |")
        lines.append(f"| {name} | tokenize | | | | {entry['tokenize_tokens_per_s'] / 1e6:.2f} |")
    for name, entry in result["sets"].items():
        ratios = {k: round(v, 2) for k, v in entry.items() if "share" in k or "_x_" in k}
        lines.append(f"{name}: {ratios}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from lam_embed.data import default_data_dir

    data = default_data_dir()
    p = argparse.ArgumentParser(prog="benchmark_encode.py", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--lam", default="lam", help="LAM sentence-transformers folder (scripts/assemble_lam.py writes 'lam')")
    p.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 folder or hub name (default: the teacher's path)")
    p.add_argument("--data-dir", default=str(data) if data else None, help="the shared data folder ($LAM_DATA_DIR)")
    p.add_argument("--sentences", type=int, default=20000, help="corpus sentences in the first set")
    p.add_argument("--passages", type=int, default=5000, help="corpus passages in the second set")
    p.add_argument("--documents", type=int, default=200, help="Wikipedia articles in the third set")
    p.add_argument("--document-tokens", type=int, default=8192, help="LAM reads an article up to this many tokens")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the plain encode of LAM")
    p.add_argument("--minilm-batch-sizes", type=int, nargs="+", default=[64, 256, 1024],
                   help="batch sizes tried for MiniLM's encode (the best is compared)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens a batch of encode_texts and of chunk-mean (default: encode_texts' default on the device)")
    p.add_argument("--tokenizer-threads", type=int, default=None,
                   help="blocks encode_texts tokenizes at once (default: encode_texts' default)")
    p.add_argument("--tokenizer-processes", action=argparse.BooleanOptionalAction, default=None,
                   help="encode_texts tokenizes in worker processes, one a tokenizer thread "
                        "(default: encode_texts' default, on where the model runs on CUDA)")
    p.add_argument("--repeats", type=int, default=2, help="timed warm calls (the fastest is kept)")
    p.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the first call of LAM's encode_texts and of MiniLM (its largest batch, chunk-mean) in a fresh process each")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--output", default=None, help="JSON file for the figures")
    p.add_argument("--first-call", nargs=4, metavar=("SET", "METHOD", "MODEL", "MAX_LENGTH"), default=None,
                   help=argparse.SUPPRESS)  # the child process of a first-call measurement
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options with the device-dependent defaults filled; usage errors exit 2."""
    import torch

    p = build_parser()
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.batch_tokens is None:
        from lam_embed.inference.pipeline import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS

        args.batch_tokens = GPU_BATCH_TOKENS if args.device.startswith("cuda") else CPU_BATCH_TOKENS
    if not args.data_dir or not Path(args.data_dir).is_dir():
        p.error(f"--data-dir: no folder {args.data_dir} (set LAM_DATA_DIR)")
    for option in ("sentences", "passages", "documents", "document_tokens", "batch_size", "batch_tokens", "repeats"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be a positive integer, got {getattr(args, option)}")
    if args.tokenizer_threads is not None and args.tokenizer_threads < 1:
        p.error(f"--tokenizer-threads must be a positive integer, got {args.tokenizer_threads}")
    if not args.first_call and not Path(args.lam).is_dir():
        p.error(f"--lam: no folder {args.lam} (python scripts/assemble_lam.py writes 'lam')")
    return args


def main(argv=None) -> int:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.first_call:
        _first_call_main(args)
        return 0
    from lam_embed import resolve_teacher_path
    from lam_embed.inference.tokenization import tokenizer_runs_serially

    args.minilm = args.minilm or resolve_teacher_path()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The fast path's tokenization runs on the tokenizer's threads; with
    # TOKENIZERS_PARALLELISM=false each call runs on one, and the figures measure that.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if tokenizer_runs_serially():
        logger.warning("TOKENIZERS_PARALLELISM=%s: each tokenizer call runs on one thread (the 'tokenize' row "
                       "and MiniLM's encode on one core)", os.environ["TOKENIZERS_PARALLELISM"])
    from lam_embed.environment import write_result

    def save(result):
        if args.output:
            write_result(args.output, result, torch.device(args.device), argv)

    result = run(args, save)
    print(format_table(result))
    print(json.dumps({name: {k: v for k, v in entry.items() if k != "rows"} for name, entry in result["sets"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
