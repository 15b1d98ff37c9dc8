"""What a result was measured with: library versions and the device's name."""

from __future__ import annotations

import platform


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
