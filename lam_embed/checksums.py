"""sha256 checksums of weight files, so that a damaged or changed file is an error naming it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: str | os.PathLike, checksums: dict[str, str]) -> None:
    """Raise ValueError naming the first file of ``folder`` whose sha256 is not the recorded one."""
    for name, expected in sorted(checksums.items()):
        path = Path(folder) / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (its checksum is recorded)")
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(f"{path} is damaged or was changed: sha256 {actual[:16]}..., recorded {expected[:16]}...")
