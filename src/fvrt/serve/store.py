"""The results store: one folder (local, or shared by several ingresses) holding `<id>.mp4` and `<id>.json`.

Every file is written to a temporary name in the folder and renamed into place when complete, so a reader never
sees a partial MP4 (the record is written after its MP4: a record that says "completed" has its video). Results
expire by age and by the folder's total size, oldest first (`sweep`), both configurable.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from fvrt.runtime.media import write_atomic

ID_PATTERN = re.compile(r"^video_[0-9a-f]{32}$")
DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_MAX_BYTES = 20 << 30  # ~2000 distilled 1080p MP4s of 121 frames


class ResultStore:
    def __init__(self, root: str | Path, *, max_age_s: float = DEFAULT_MAX_AGE_S, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.scratch = self.root / ".scratch"  # request checks (uploaded images); never served
        self.scratch.mkdir(exist_ok=True)
        self.max_age_s, self.max_bytes = float(max_age_s), int(max_bytes)

    def mp4(self, video_id: str) -> Path:
        return self.root / f"{video_id}.mp4"

    def _record(self, video_id: str) -> Path:
        return self.root / f"{video_id}.json"

    def put_mp4(self, video_id: str, data: bytes) -> Path:
        path = self.mp4(video_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def put_record(self, video_id: str, record: dict[str, Any]) -> None:
        write_atomic(self._record(video_id), json.dumps(record) + "\n")

    def get_record(self, video_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record(video_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def delete(self, video_id: str) -> bool:
        """Remove a result; False when there was none."""
        found = False
        for path in (self._record(video_id), self.mp4(video_id)):  # the record first: no "completed" without video
            try:
                path.unlink()
                found = True
            except FileNotFoundError:
                pass
        return found

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete results older than max_age_s, then the oldest until the folder holds at most max_bytes.
        Returns the ids deleted."""
        now = time.time() if now is None else now
        entries = []
        for record in self.root.glob("video_*.json"):
            video_id = record.stem
            try:
                mtime = record.stat().st_mtime
                size = record.stat().st_size + (self.mp4(video_id).stat().st_size if self.mp4(video_id).exists() else 0)
            except FileNotFoundError:  # deleted meanwhile
                continue
            entries.append((mtime, size, video_id))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        gone = []
        for mtime, size, video_id in entries:
            if now - mtime > self.max_age_s or total > self.max_bytes:
                self.delete(video_id)
                total -= size
                gone.append(video_id)
        return gone
