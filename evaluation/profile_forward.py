"""Where the time of an encoder forward goes: LAM and all-MiniLM-L6-v2 side by side under
torch.profiler, kernels grouped by kind (matrix products, our delta-rule kernels,
torch.compile's fused kernels, attention, other elementwise work).

It also compares the wall time of a forward with the time the GPU spends in kernels:
a forward whose kernels fill only part of its wall time is limited by the Python and
launch work on the CPU, not by the GPU. The longest stretches with no kernel running,
named by the kernels around them, show where (for a CUDA graph replay: which launches
leave the GPU waiting).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lam_embed import LAMConfig
from lam_embed.cli import DefaultsHelpFormatter
from lam_embed.environment import write_result

from .benchmark import (
    DTYPES,
    Clock,
    random_ids,
    synchronize,
    load_lam,
    load_minilm_bert,
    measure,
    minilm_for_length,
)

logger = logging.getLogger(__name__)

# Kernel kinds, matched in this order against the lower-cased kernel name.
KINDS = (
    ("delta rule (ours)", ("block_prepare", "chunk_scan", "state_recurrence", "chunk_output")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "efficient")),
    ("matrix product", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("torch.compile fused", ("triton_",)),
    ("layer norm", ("layer_norm", "layernorm")),
    ("copy / cast / cat", ("copy", "cat", "fill", "convert")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KINDS:
        if any(key in lowered for key in keys):
            return kind
    return "other elementwise"


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = 10) -> tuple[float, list]:
    """GPU idle time between kernels: ``kernels`` holds (start, end, name) of every kernel
    (any order, overlapping allowed). Returns the idle time in all (the time no kernel ran
    between the first start and the last end) and the ``top`` longest idle stretches as
    (length, kernel before, kernel after), longest first. Inside a CUDA graph replay the
    stretches show which launches leave the GPU waiting."""
    gaps, total = [], 0.0
    ordered = sorted(kernels)
    if not ordered:
        return 0.0, []
    busy_until, last = ordered[0][1], ordered[0][2]
    for start, end, name in ordered[1:]:
        if start > busy_until:
            total += start - busy_until
            gaps.append((start - busy_until, last, name))
        if end >= busy_until:
            busy_until, last = end, name
    gaps.sort(key=lambda gap: -gap[0])
    return total, gaps[:top]


def profile_call(fn, device: torch.device, iters: int) -> dict:
    """Wall time of ``fn`` (median of ``iters`` synchronised calls) and, from one profiled
    run of ``iters`` calls, the GPU kernel time per call by kernel and by kind."""
    timed = measure(lambda: fn, device=device, warmup=0, repeats=iters, clock=Clock(0), label="wall time")
    if timed["status"] != "ok":
        raise RuntimeError(f"the forward failed: {timed['reason']}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        synchronize(device)
    per_kernel = defaultdict(float)
    spans = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.time_range.elapsed_us() / 1000 / iters  # ms a call
            spans.append((event.time_range.start, event.time_range.end, event.name[:60]))
    # Over all iters calls: the stretches between calls (host work, synchronisation) are
    # among them, the longest usually.
    idle_us, longest = idle_gaps(spans)
    by_kind = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind_of(name)] += ms
    wall_ms = timed["median_s"] * 1000
    gpu_ms = sum(per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda item: -item[1])
    return {
        "wall_ms": round(wall_ms, 3),
        "gpu_kernel_ms": round(gpu_ms, 3),
        "gpu_busy_fraction": round(gpu_ms / wall_ms, 3) if wall_ms else None,
        "by_kind_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda item: -item[1])},
        "top_kernels_ms": [[name[:120], round(ms, 4)] for name, ms in top[:25]],
        # Idle time from the first kernel of the profiled calls to the last, per call (the
        # stretches between calls included).
        "gpu_idle_ms": round(idle_us / 1000 / iters, 3),
        "longest_idle_us": [[round(gap, 1), before, after] for gap, before, after in longest],
    }


def host_floor(lam, minilm, device: torch.device, iters: int) -> dict:
    """Wall milliseconds of a forward of one 16-token input, whose GPU work is negligible:
    the Python and launch work on the CPU that a forward costs whatever its size. Where
    it comes near a large input's kernel time, the GPU waits for the CPU."""
    ids = random_ids(1, 16, lam.config.vocab_size, device, 0)
    ones = torch.ones_like(ids)
    calls = {
        "lam": lambda: lam(input_ids=ids, attention_mask=ones),
        "minilm": lambda: minilm(input_ids=ids, attention_mask=ones, token_type_ids=torch.zeros_like(ids)),
    }
    floor = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            timed = measure(lambda fn=fn: fn, device=device, warmup=3, repeats=max(iters, 20), clock=Clock(0),
                            label=f"host floor {name}")
            floor[name] = round(timed["median_s"] * 1000, 3) if timed["status"] == "ok" else None
    return floor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Profile the forward of LAM and of all-MiniLM-L6-v2 (CUDA): GPU time by kernel kind, "
        "and wall time against GPU busy time.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 8192], help="sequence lengths to profile")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per batch: batch = tokens // length")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and activations of both models")
    p.add_argument("--impl", default="auto", help="LAM delta_impl")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="LAM's config.cuda_graphs: replay a CUDA graph per input shape (off: launch each kernel from Python)")
    p.add_argument("--gelu-epilogue", choices=("on", "off"), default="on",
                   help="LAMConfig.gelu_epilogue: the FFN's bias and GELU in the matrix product's "
                   "epilogue for 16-bit inputs (off: a separate GELU kernel, erf form)")
    p.add_argument("--graph-streams", type=int, default=LAMConfig().graph_streams,
                   help="LAMConfig.graph_streams: the parts of the batch whose layers a CUDA graph runs "
                   "on as many streams (1: one stream)")
    p.add_argument("--graph-streams-min-tokens", type=int, default=LAMConfig().graph_streams_min_tokens,
                   help="LAMConfig.graph_streams_min_tokens: batches of fewer tokens (batch x padded "
                   "length) run on one stream")
    p.add_argument("--iters", type=int, default=10, help="calls timed, and calls profiled, per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (they hold torch.compile's compilation)")
    p.add_argument("--model", default=None, help="a LAM SentenceTransformer folder (default: LAM built from the teacher; same speed)")
    p.add_argument("--teacher", default=None, help="all-MiniLM-L6-v2 folder or hub name (default: the offline copy when the hub is unreachable)")
    p.add_argument("--output", default="runs/profile-forward.json", help="JSON file for the figures")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("profile_forward needs a CUDA GPU (the kernel-time figures come from CUDA events)")
    if any(length < 1 for length in args.lengths) or args.iters < 1 or args.warmup < 0 or args.graph_streams < 1:
        raise SystemExit("--lengths, --iters and --graph-streams must be >= 1, --warmup >= 0")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    _, lam = load_lam(args)
    lam.config.delta_impl = args.impl
    lam.config.cuda_graphs = args.cuda_graphs == "on"
    lam.config.gelu_epilogue = args.gelu_epilogue == "on"
    lam.config.graph_streams = args.graph_streams
    lam.config.graph_streams_min_tokens = args.graph_streams_min_tokens
    lam.to(device=device, dtype=dtype)
    bert = load_minilm_bert(args)
    result = {"dtype": args.dtype, "impl": args.impl, "cuda_graphs": args.cuda_graphs,
              "gelu_epilogue": args.gelu_epilogue, "graph_streams": args.graph_streams,
              "graph_streams_min_tokens": args.graph_streams_min_tokens, "lengths": {}}
    result["host_floor_ms"] = host_floor(lam, minilm_for_length(bert, 16).to(device=device, dtype=dtype), device,
                                         args.iters)
    logger.info("host floor (wall of a forward of one 16-token input), ms: %s", result["host_floor_ms"])
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        minilm = minilm_for_length(bert, length).to(device=device, dtype=dtype)
        ids = random_ids(batch, length, lam.config.vocab_size, device, args.seed)
        ones = torch.ones_like(ids)
        calls = {
            "lam": lambda ids=ids, ones=ones: lam(input_ids=ids, attention_mask=ones),
            "minilm": lambda m=minilm, ids=ids, ones=ones: m(input_ids=ids, attention_mask=ones,
                                                             token_type_ids=torch.zeros_like(ids)),
        }
        entry = result["lengths"][str(length)] = {"batch_size": batch}
        with torch.inference_mode():
            for name, fn in calls.items():
                for _ in range(args.warmup):
                    fn()
                entry[name] = profile_call(fn, device, args.iters)
                logger.info("L=%d %s: %s", length, name, json.dumps({k: v for k, v in entry[name].items() if k != "top_kernels_ms"}))
        minilm.to("cpu")  # the next length's copy (and only it) on the GPU
        calls.clear()
        torch.cuda.empty_cache()
    write_result(args.output, result, device, argv)
    print(f"Host floor (wall of a forward of one 16-token input): LAM {result['host_floor_ms']['lam']} ms, "
          f"MiniLM {result['host_floor_ms']['minilm']} ms")
    for length, entry in result["lengths"].items():
        print(f"\nL={length} batch={entry['batch_size']}")
        for name in ("lam", "minilm"):
            e = entry[name]
            print(f"  {name}: wall {e['wall_ms']:.2f} ms, GPU kernels {e['gpu_kernel_ms']:.2f} ms "
                  f"(busy {e['gpu_busy_fraction']:.0%}), GPU idle between kernels {e['gpu_idle_ms']:.2f} ms a call")
            for kind, ms in e["by_kind_ms"].items():
                print(f"    {kind:<22} {ms:8.3f} ms")
            for kernel, ms in e["top_kernels_ms"][:12]:
                print(f"      {ms:8.3f}  {kernel}")
            print("    longest idle stretches (us, kernel before -> after):")
            for gap, before, after in e["longest_idle_us"][:5]:
                print(f"      {gap:8.1f}  {before[:50]} -> {after[:50]}")
    return result
