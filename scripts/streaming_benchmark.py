"""Memory and time of streamed encoding (lam_embed.streaming) as documents grow, the cost
of appending to a long document against encoding it again, and the exactness of streaming
against one pass. Times are warm: each process first encodes a small document (its
seconds are reported as warm_up_seconds).

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

from lam_embed.cli import DefaultsHelpFormatter

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


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image, so a
    child does not inherit the parent's peak as getrusage's ru_maxrss does across fork and
    exec (the parent's one-pass exactness check would otherwise set every child's figure)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_length(model_path: str, tokens: int, segment_tokens: int, device: str) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    import lam_embed

    model = SentenceTransformer(model_path, device=device)
    text_pieces = list(pieces(model.tokenizer, tokens))
    cold = warm_up(model, segment_tokens)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    document = lam_embed.start_document(model, segment_tokens)
    for piece in text_pieces:
        document.append(piece)
    embedding = document.embedding
    seconds = time.perf_counter() - start
    row = {"tokens": document.tokens + 1, "seconds": round(seconds, 2),
           "microseconds_per_token": round(1e6 * seconds / (document.tokens + 1), 2),
           "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_mib": round(rss_before, 1), "norm": float((embedding ** 2).sum() ** 0.5),
           "warm_up_seconds": round(cold, 2)}
    if device.startswith("cuda"):
        row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def warm_up(model, segment_tokens: int) -> float:
    """Seconds of a first small document (two segments, an append, its embedding) in this
    process: kernel compilation and first calls, kept out of the timed figures."""
    import lam_embed

    start = time.perf_counter()
    document = lam_embed.start_document(model, segment_tokens)
    for piece in pieces(model.tokenizer, 2 * segment_tokens, segment_tokens):
        document.append(piece)
    document.append(SENTENCE.format(i=0))
    _ = document.embedding
    return time.perf_counter() - start


def measure_append(model_path: str, tokens: int, append_tokens: int, segment_tokens: int, device: str,
                   repeats: int = 5, one_pass_repeats: int = 3) -> dict:
    """Seconds to append ``append_tokens`` tokens to a document of ``tokens`` tokens and get
    its embedding (``repeats`` appends one after the other: the first and the median), against
    encoding the grown document again: streamed (encode_document) and, with
    ``one_pass_repeats``, in one ``SentenceTransformer.encode`` pass (the median of that many
    timed passes after two untimed ones; memory then grows with the length)."""
    import statistics

    from sentence_transformers import SentenceTransformer

    import lam_embed

    model = SentenceTransformer(model_path, device=device)
    base = list(pieces(model.tokenizer, tokens))
    extra = next(pieces(model.tokenizer, append_tokens, append_tokens))
    cold = warm_up(model, segment_tokens)
    document = lam_embed.start_document(model, segment_tokens)
    for piece in base:
        document.append(piece)
    _ = document.embedding
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        document.append(extra)
        appended = document.embedding
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    again = lam_embed.encode_document(model, [*base, *[extra] * repeats], segment_tokens=segment_tokens)
    full_seconds = time.perf_counter() - start
    median = statistics.median(seconds)
    row = {"tokens": document.tokens + 1, "appended_tokens": append_tokens, "appends": repeats,
           "append_seconds": round(median, 4), "first_append_seconds": round(seconds[0], 4),
           "reencode_seconds": round(full_seconds, 3), "ratio": round(median / full_seconds, 5),
           "max_abs_difference": float(abs(appended - again).max()), "warm_up_seconds": round(cold, 2)}
    if one_pass_repeats:
        text = " ".join([*base, *[extra] * repeats])
        model.max_seq_length = 2 * document.tokens  # the whole text, untruncated
        passes = []
        for number in range(2 + one_pass_repeats):
            start = time.perf_counter()
            model.encode(text)
            if number >= 2:  # the first passes compile and capture for this length
                passes.append(time.perf_counter() - start)
        one_pass = statistics.median(passes)
        row.update(one_pass_seconds=round(one_pass, 4), ratio_to_one_pass=round(median / one_pass, 5))
    return row


def stream_ids(lam, ids: list[int], cuts: list[int]):
    """The last hidden state of ``ids`` read piece by piece through the carried state (the
    model's own API: past_state and use_cache), cut at ``cuts``; one row per token."""
    import torch

    state, pending, outputs, start = None, [], [], 0
    for cut in [*cuts, len(ids)]:
        piece = pending + ids[start:cut]
        start = cut
        out = lam(input_ids=torch.tensor([piece], device=lam.device), past_state=state, use_cache=True)
        done = int(out.state.offset[0]) - (0 if state is None else int(state.offset[0]))
        last = cut == len(ids)
        outputs.append(out.last_hidden_state[0] if last else out.last_hidden_state[0, :done])
        pending, state = piece[done:], out.state
    return torch.cat(outputs)


def measure_exactness(model_path: str, lengths: list[int], device: str, dtype: str, seed: int = 0) -> list[dict]:
    """For documents of each length, token ids cut at random points into 1 to 20 pieces:
    the largest difference of the streamed last hidden states (before the token repeat
    cap's weights, which a carried forward does not apply) and of the pooled unit embedding
    (with the model's cap) from one pass over the same ids."""
    import random

    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    import lam_embed  # noqa: F401  (registers LAM)
    from lam_embed.modeling_lam import weight_rows_for_pooling

    model = SentenceTransformer(model_path, device=device)
    lam = model[0].auto_model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    tok = model.tokenizer
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        text = " ".join(pieces(tok, length))
        body = tok(text, add_special_tokens=False, verbose=False)["input_ids"][: max(0, length - 2)]
        ids = ([tok.cls_token_id] + body + [tok.sep_token_id])[:length]
        count = rng.randint(1, min(20, len(ids)))
        cuts = sorted(rng.sample(range(1, len(ids)), count - 1)) if count > 1 else []
        ids_tensor = torch.tensor([ids], device=device)
        with torch.inference_mode():
            pooled_whole = lam(input_ids=ids_tensor).last_hidden_state[0].float().mean(0)
            cap, lam.config.token_repeat_cap = lam.config.token_repeat_cap, None
            try:  # a carried forward gives the hidden states before the cap's weights
                whole = lam(input_ids=ids_tensor).last_hidden_state[0].float()
            finally:
                lam.config.token_repeat_cap = cap
            streamed = stream_ids(lam, ids, cuts).float()
            if cap is not None:
                streamed_pooled = weight_rows_for_pooling(streamed[None], ids_tensor, torch.ones_like(ids_tensor), cap,
                                                          lam.config.vocab_size)[0].mean(0)
            else:
                streamed_pooled = streamed.mean(0)
        pooled = [F.normalize(h, dim=0) for h in (pooled_whole, streamed_pooled)]
        rows.append({"tokens": len(ids), "pieces": count,
                     "max_abs_hidden": float((whole - streamed).abs().max()),
                     "hidden_scale": float(whole.abs().max()),
                     "max_abs_embedding": float((pooled[0] - pooled[1]).abs().max()),
                     "cosine": float(pooled[0] @ pooled[1])})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="lam", help="LAM sentence-transformers folder (scripts/assemble_lam.py makes 'lam')")
    p.add_argument("--lengths", type=int, nargs="*", default=[32768, 262144, 1048576],
                   help="document lengths in tokens whose memory and time are measured (none: skip)")
    p.add_argument("--segment-tokens", type=int, default=None,
                   help="tokens encoded per step (default: lam_embed's for the device, "
                        "lam_embed.streaming.DEFAULT_SEGMENT_TOKENS)")
    p.add_argument("--append-base", type=int, default=100_000, help="tokens of the document appended to (0: skip)")
    p.add_argument("--append-tokens", type=int, default=100, help="tokens appended at a time")
    p.add_argument("--append-repeats", type=int, default=5,
                   help="appends one after the other; the figure is their median (the first is reported too)")
    p.add_argument("--one-pass-repeats", type=int, default=3,
                   help="timed one-pass encodes of the grown document, for the append's second ratio (0: skip)")
    p.add_argument("--exactness-lengths", type=int, nargs="*", default=[1, 5000, 40000],
                   help="document lengths in tokens (with [CLS] and [SEP]) whose ids, cut at random points into "
                        "1 to 20 pieces, are streamed and compared with one pass (none: skip)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights and compute dtype of the exactness comparison")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--output", default=None, help="write the figures to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, value = args.child.split(":")
        if kind == "length":
            row = measure_length(args.model, int(value), args.segment_tokens, args.device)
        else:
            row = measure_append(args.model, int(value), args.append_tokens, args.segment_tokens, args.device,
                                 args.append_repeats, args.one_pass_repeats)
        print(json.dumps(row))
        return row
    if args.segment_tokens is None:
        from lam_embed.streaming import DEFAULT_SEGMENT_TOKENS

        args.segment_tokens = DEFAULT_SEGMENT_TOKENS["cuda" if args.device.startswith("cuda") else "cpu"]
    if (any(n < 2 for n in args.lengths) or args.segment_tokens < 1 or args.append_tokens < 1
            or args.append_repeats < 1 or args.one_pass_repeats < 0):
        p.error("--lengths must be >= 2, --segment-tokens, --append-tokens and --append-repeats >= 1, "
                "--one-pass-repeats >= 0")
    if any(n < 1 for n in args.exactness_lengths):
        p.error("--exactness-lengths must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    common = ["--model", args.model, "--segment-tokens", str(args.segment_tokens), "--device", args.device,
              "--append-tokens", str(args.append_tokens), "--append-repeats", str(args.append_repeats),
              "--one-pass-repeats", str(args.one_pass_repeats)]

    def child(spec: str) -> dict:
        done = subprocess.run([sys.executable, __file__, *common, "--child", spec], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the measurement {spec} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = {"segment_tokens": args.segment_tokens, "device": args.device, "lengths": []}
    if args.exactness_lengths:
        result["exactness"] = {"dtype": args.dtype,
                               "documents": measure_exactness(args.model, args.exactness_lengths, args.device,
                                                              args.dtype)}
        for row in result["exactness"]["documents"]:
            print(f"{row['tokens']:>9,} tokens in {row['pieces']:>2} pieces: streamed - one pass, last hidden state "
                  f"{row['max_abs_hidden']:.1e} (of {row['hidden_scale']:.1f}), embedding {row['max_abs_embedding']:.1e}, "
                  f"cosine {row['cosine']:.6f}", flush=True)
    for length in args.lengths:
        row = child(f"length:{length}")
        result["lengths"].append(row)
        print(f"{row['tokens']:>9,} tokens  {row['seconds']:8.1f} s  {row['microseconds_per_token']:7.1f} us/token  "
              f"peak RSS {row['peak_rss_mib']:7.0f} MiB" + (f"  peak CUDA {row['peak_cuda_mib']:.0f} MiB"
                                                            if "peak_cuda_mib" in row else ""), flush=True)
    if args.append_base:
        result["append"] = row = child(f"append:{args.append_base}")
        print(f"append {row['appended_tokens']} tokens to {args.append_base:,} ({row['appends']} times, median): "
              f"{row['append_seconds']:.3f} s (first {row['first_append_seconds']:.3f} s) against "
              f"{row['reencode_seconds']:.3f} s to encode it again ({100 * row['ratio']:.2f}%; embeddings differ by "
              f"{row['max_abs_difference']:.1e})" + (f"; one pass over it {row['one_pass_seconds']:.3f} s "
                                                    f"({100 * row['ratio_to_one_pass']:.2f}%)"
                                                    if "one_pass_seconds" in row else ""))
    if args.output:
        from lam_embed.environment import write_result

        write_result(args.output, result, args.device, argv)
    return result


if __name__ == "__main__":
    main()
