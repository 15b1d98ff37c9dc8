"""Memory and time of streamed encoding (lam_embed.streaming) as documents grow, and the
cost of appending to a long document against encoding it again.

Each length runs in a fresh process so that its peak resident memory (CPU) or peak CUDA
memory is its own. The document is generated: numbered English sentences appended as
pieces until it holds the requested number of tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

SENTENCE = "Sentence {i} of the document says that the river ran fast under the old stone bridge."


def pieces(tokenizer, tokens: int, piece_tokens: int = 2000):
    """Pieces of text of about ``piece_tokens`` tokens each, ``tokens`` in all (at least)."""
    made, i = 0, 0
    while made < tokens:
        piece, piece_made = [], 0
        while piece_made < piece_tokens and made + piece_made < tokens:
            text = SENTENCE.format(i=i)
            piece.append(text)
            piece_made += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            i += 1
        made += piece_made
        yield " ".join(piece)


def measure_length(model_path: str, tokens: int, segment_tokens: int, device: str) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    import lam_embed

    model = SentenceTransformer(model_path, device=device)
    text_pieces = list(pieces(model.tokenizer, tokens))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    document = lam_embed.start_document(model, segment_tokens)
    for piece in text_pieces:
        document.append(piece)
    embedding = document.embedding
    seconds = time.perf_counter() - start
    row = {"tokens": document.tokens + 1, "seconds": round(seconds, 2),
           "microseconds_per_token": round(1e6 * seconds / (document.tokens + 1), 2),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "rss_before_mib": round(rss_before / 1024, 1), "norm": float((embedding ** 2).sum() ** 0.5)}
    if device.startswith("cuda"):
        row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def measure_append(model_path: str, tokens: int, append_tokens: int, segment_tokens: int, device: str) -> dict:
    """Seconds to append ``append_tokens`` tokens to a document of ``tokens`` tokens and get
    its embedding, against encoding the grown document again."""
    from sentence_transformers import SentenceTransformer

    import lam_embed

    model = SentenceTransformer(model_path, device=device)
    base = list(pieces(model.tokenizer, tokens))
    extra = next(pieces(model.tokenizer, append_tokens, append_tokens))
    document = lam_embed.start_document(model, segment_tokens)
    for piece in base:
        document.append(piece)
    _ = document.embedding
    start = time.perf_counter()
    document.append(extra)
    appended = document.embedding
    append_seconds = time.perf_counter() - start
    start = time.perf_counter()
    again = lam_embed.encode_document(model, [*base, extra], segment_tokens=segment_tokens)
    full_seconds = time.perf_counter() - start
    return {"tokens": document.tokens + 1, "appended_tokens": append_tokens, "append_seconds": round(append_seconds, 3),
            "reencode_seconds": round(full_seconds, 2), "ratio": round(append_seconds / full_seconds, 5),
            "max_abs_difference": float(abs(appended - again).max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lam", help="LAM sentence-transformers folder (scripts/assemble_lam.py makes 'lam')")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 262144, 1048576], help="document lengths in tokens")
    p.add_argument("--segment-tokens", type=int, default=8192, help="tokens encoded per step")
    p.add_argument("--append-base", type=int, default=100_000, help="tokens of the document appended to (0: skip)")
    p.add_argument("--append-tokens", type=int, default=100, help="tokens appended")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--output", default=None, help="write the figures to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, value = args.child.split(":")
        if kind == "length":
            row = measure_length(args.model, int(value), args.segment_tokens, args.device)
        else:
            row = measure_append(args.model, int(value), args.append_tokens, args.segment_tokens, args.device)
        print(json.dumps(row))
        return row
    if any(n < 2 for n in args.lengths) or args.segment_tokens < 1 or args.append_tokens < 1:
        p.error("--lengths must be >= 2, --segment-tokens and --append-tokens >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    common = ["--model", args.model, "--segment-tokens", str(args.segment_tokens), "--device", args.device,
              "--append-tokens", str(args.append_tokens)]

    def child(spec: str) -> dict:
        done = subprocess.run([sys.executable, __file__, *common, "--child", spec], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the measurement {spec} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = {"segment_tokens": args.segment_tokens, "device": args.device, "lengths": []}
    for length in args.lengths:
        row = child(f"length:{length}")
        result["lengths"].append(row)
        print(f"{row['tokens']:>9,} tokens  {row['seconds']:8.1f} s  {row['microseconds_per_token']:7.1f} us/token  "
              f"peak RSS {row['peak_rss_mib']:7.0f} MiB" + (f"  peak CUDA {row['peak_cuda_mib']:.0f} MiB"
                                                            if "peak_cuda_mib" in row else ""), flush=True)
    if args.append_base:
        result["append"] = row = child(f"append:{args.append_base}")
        print(f"append {row['appended_tokens']} tokens to {row['tokens'] - row['appended_tokens']:,}: "
              f"{row['append_seconds']:.3f} s against {row['reencode_seconds']:.1f} s to encode it again "
              f"({100 * row['ratio']:.2f}%; embeddings differ by {row['max_abs_difference']:.1e})")
    if args.output:
        from lam_embed.environment import write_result

        write_result(args.output, result, args.device, argv)
    return result


if __name__ == "__main__":
    main()
