"""Peak memory and time of one long input through LAM on CPU, per length.

Each length runs in a fresh process, so each peak resident set size (RSS) is that
length's own. Linear memory shows as a peak growing in proportion to the length.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

from lam_embed.backends import BACKEND_NAMES
from lam_embed.cli import DefaultsHelpFormatter


def measure(length: int, impl: str) -> dict:
    import torch

    import lam_embed

    torch.manual_seed(0)
    model = lam_embed.LAMModel(lam_embed.LAMConfig(delta_impl=impl)).eval()
    ids = torch.randint(1000, 20000, (1, length))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids).last_hidden_state
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"tokens": length, "impl": impl, "seconds": round(seconds, 2), "finite": bool(torch.isfinite(out).all()),
            "peak_rss_mib": round(peak / 1024, 1), "rss_before_forward_mib": round(base / 1024, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768], help="input lengths in tokens")
    p.add_argument("--impl", default="chunk", choices=BACKEND_NAMES, help="delta_impl to run")
    p.add_argument("--output", default=None, help="write the rows to this JSON file")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(length < 1 for length in args.lengths):
        p.error(f"--lengths must be positive, got {args.lengths}")
    if args.child is not None:
        print(json.dumps(measure(args.child, args.impl)))
        return
    rows = []
    for length in args.lengths:
        result = subprocess.run([sys.executable, __file__, "--child", str(length), "--impl", args.impl],
                                capture_output=True, text=True)
        if result.returncode != 0:
            # The child's own error, not a CalledProcessError that hides it.
            raise SystemExit(f"long_input_memory.py: the run of {length} tokens with --impl {args.impl} failed "
                             f"(exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{row['tokens']:>6} tokens  {row['seconds']:7.1f} s  peak RSS {row['peak_rss_mib']:7.0f} MiB "
              f"(model loaded: {row['rss_before_forward_mib']:.0f} MiB)", flush=True)
    if args.output:
        from lam_embed.environment import write_result

        write_result(args.output, {"impl": args.impl, "rows": rows}, "cpu", argv)


if __name__ == "__main__":
    main()
