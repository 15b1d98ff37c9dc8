"""What a result was measured with (library versions, the device's name, the commit), and
how a result file is written."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
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


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as JSON atomically (its folder made if needed): a reader, or a run
    stopped mid-write, never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
