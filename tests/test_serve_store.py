"""The serving results store: atomic files, deletion, expiry by age and by total size (oldest first)."""

from __future__ import annotations

import os
from pathlib import Path

from fvrt.serve.store import ID_PATTERN, ResultStore


def _put(store: ResultStore, n: int, size: int, mtime: float) -> str:
    video_id = f"video_{n:032x}"
    store.put_mp4(video_id, b"m" * size)
    store.put_record(video_id, {"id": video_id, "status": "completed"})
    for path in (store.mp4(video_id), store.root / f"{video_id}.json"):
        os.utime(path, (mtime, mtime))
    return video_id


def test_put_get_delete(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results")
    video_id = _put(store, 1, 10, 1000.0)
    assert ID_PATTERN.match(video_id) and not ID_PATTERN.match("../etc/passwd")
    assert store.get_record(video_id) == {"id": video_id, "status": "completed"}
    assert store.mp4(video_id).read_bytes() == b"m" * 10
    assert not [p for p in store.root.iterdir() if "partial" in p.name]
    assert store.delete(video_id) and not store.delete(video_id)
    assert store.get_record(video_id) is None and not store.mp4(video_id).exists()


def test_sweep_by_age_then_by_size(tmp_path: Path) -> None:
    # Precondition: four results of ~1000 bytes, one a day old
    store = ResultStore(tmp_path / "results", max_age_s=3600, max_bytes=2500)
    old, a, b, c = (_put(store, n, 1000, t) for n, t in ((1, 0.0), (2, 86000.0), (3, 86100.0), (4, 86200.0)))

    # Under test
    gone = store.sweep(now=86400.0)

    # Postcondition: the day-old one by age, then the oldest until the folder is under 2500 bytes
    assert gone == [old, a]
    assert [store.get_record(v) is not None for v in (b, c)] == [True, True]
    assert store.sweep(now=86400.0) == []
