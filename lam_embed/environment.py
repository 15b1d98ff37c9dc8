"""What a result was measured with: library versions, the device's name, the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the code that runs: $LAM_COMMIT where the code travels without its
    git folder (the GPU machine), else ``git rev-parse HEAD`` of this checkout."""
    if os.environ.get("LAM_COMMIT"):
        return os.environ["LAM_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


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


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
