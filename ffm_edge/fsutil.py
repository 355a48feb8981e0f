"""Durable file writes shared by the edge outbox and the hub store."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_durably"]


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` so that after a crash ``path`` holds either nothing or all of it.

    Write to a temporary sibling, fsync it, rename it over ``path``, then fsync the folder so the
    rename itself survives a power cut. Readers never see a half-written file.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
