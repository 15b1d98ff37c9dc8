"""What a result was measured with (library versions, the device's name, the commit), and
how a result file is written."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def git(*args: str) -> str | None:
    """Output of ``git <args>`` in this checkout, or None where git or the checkout is absent."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str | None:
    """The commit of the code that runs: $LAM_COMMIT where it runs from a copy without its
    git folder, else ``git rev-parse HEAD`` of this checkout."""
    return os.environ.get("LAM_COMMIT") or git("rev-parse", "HEAD")


def library_versions() -> dict[str, str]:
    import sentence_transformers
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }
    try:
        import datasets
    except ImportError:  # optional where only plain files are read
        return versions
    return {**versions, "datasets": datasets.__version__}


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name for a CUDA device (a torch.device or its string), else the CPU's."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return cpu_name()


def write_json(path: str | os.PathLike, data: dict | list) -> None:
    """Write ``data`` as JSON atomically (its folder made if needed): a reader, or a run
    stopped mid-write, never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def provenance(device, argv: list[str] | None = None) -> dict:
    """What made a result: the command (the running script with ``argv``, by default the
    process's arguments), the commit (with "+dirty" where the checkout has uncommitted
    changes to tracked files), the device's name and the time, as every result file
    records it under "provenance" (benchmarks/results/INDEX.md is built from these)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] not in ("", "-c") else None
    root = Path(__file__).resolve().parent.parent
    if script is None:
        program = ["python", "-c", "..."]
    else:
        program = ["python", str(script.relative_to(root) if script.is_relative_to(root) else script)]
    commit = git_commit() or "unknown"
    if not os.environ.get("LAM_COMMIT") and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "command": shlex.join(program + (sys.argv[1:] if argv is None else list(argv))),
        "commit": commit,
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(path: str | os.PathLike, data: dict, device, argv: list[str] | None = None) -> None:
    """Write a result file: ``data`` with its provenance (see ``provenance``) first."""
    write_json(path, {"provenance": provenance(device, argv), **data})
