"""The edge's on-disk outbox: an update stays here until the hub's receipt arrives.

A broker's PUBACK only says the broker got a message, and no broker is trusted to keep it, so the edge
keeps every encoded update on disk (written atomically) and sends it again after a disconnect, a
restart or a ``kill -9``, until the hub answers with a receipt or a rejection. The hub de-duplicates
by update id, so sending twice is harmless.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ffm_edge.errors import ConfigError
from ffm_edge.fsutil import write_durably

__all__ = ["Outbox", "OutboxItem"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class OutboxItem:
    """One pending update."""

    update_id: str
    path: Path
    size: int
    queued_at: float


class Outbox:
    """A folder of pending frames (``<id>.ffmu``) plus a ``rejected/`` folder with reasons."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.rejected_dir = self.root / "rejected"
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob("*.tmp"):  # a crash mid-write: the update was never queued
            tmp.unlink(missing_ok=True)

    def _path(self, update_id: str) -> Path:
        if not _ID.match(update_id):
            raise ConfigError(f"invalid update id {update_id!r}")
        return self.root / f"{update_id}.ffmu"

    def put(self, update_id: str, frame: bytes) -> OutboxItem:
        """Store a frame durably before it is sent for the first time."""
        path = self._path(update_id)
        write_durably(path, frame)
        return OutboxItem(update_id, path, len(frame), path.stat().st_mtime)

    def pending(self) -> list[OutboxItem]:
        """Pending updates, oldest first."""
        items = [OutboxItem(p.stem, p, p.stat().st_size, p.stat().st_mtime) for p in self.root.glob("*.ffmu")]
        return sorted(items, key=lambda item: (item.queued_at, item.update_id))

    def read(self, update_id: str) -> bytes:
        """The frame of a pending update."""
        return self._path(update_id).read_bytes()

    def acknowledge(self, update_id: str) -> None:
        """The hub receipted the update: forget it."""
        self._path(update_id).unlink(missing_ok=True)

    def reject(self, update_id: str, reason: str, detail: str = "") -> None:
        """The hub refused the update: keep it aside with the reason, never resend it."""
        path = self._path(update_id)
        if path.exists():
            os.replace(path, self.rejected_dir / path.name)
        (self.rejected_dir / f"{update_id}.json").write_text(
            json.dumps({"update_id": update_id, "reason": reason, "detail": detail, "at": time.time()})
        )

    def __len__(self) -> int:
        return len(self.pending())
