"""Soak: many videos in one process per memory mode, the host RSS (and GPU memory) after each.

    python scripts/soak.py engines/tiny --videos 50 --modes phase,keep,offload --out out/soak

Runs what `fvrt-run ENGINE_DIR --batch FILE --memory MODE` runs (the same `generate` per job, one Pipeline per
mode, the engines opened once per mode), one prompt and seed per video, and writes `soak.json` and `soak.md`:
per mode the RSS after every video and the growth per video after the first three (the warm-up: engines loaded,
allocator pools filled). Goal: flat, under 1 MiB a video.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from fvrt.runtime import cli
from fvrt.runtime.manifest import read_manifest
from fvrt.runtime.pipeline import MEMORY_POLICIES, Pipeline
from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer

WARMUP = 3  # videos before the growth is measured
MIB = 1 << 20


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/status VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak(engine_dir: Path, mode: str, videos: int, out: Path, device: str | None) -> dict:
    manifest = read_manifest(engine_dir)
    defaults = {"image": None, "image_strength": 1.0, "seed": 0, "preset": "distilled"}
    defaults.update({"height": None, "width": None, "frames": None, "fps": None})
    engines = cli.open_engines(engine_dir, device)
    pipe = Pipeline(engines, PromptTokenizer(engine_dir / TOKENIZER_DIR), memory=mode, prefetch_text=True)
    rows = []
    for i in range(videos):
        job = cli._job(manifest.profiles, {**defaults, "seed": i}, f"soak video {i}", out / f"{mode}.mp4", None)
        t = time.perf_counter()
        cli.generate(pipe, job)
        gc.collect()
        row = {"video": i + 1, "seconds": time.perf_counter() - t, "rss_mib": rss_bytes() / MIB}
        if engines.device.type == "cuda":
            row["gpu_allocated_mib"] = torch.cuda.memory_allocated(engines.device) / MIB
            row["gpu_reserved_mib"] = torch.cuda.memory_reserved(engines.device) / MIB
        rows.append(row)
        print(f"{mode:<8} video {i + 1:3d}  {row['seconds']:6.2f} s  rss {row['rss_mib']:8.1f} MiB", flush=True)
    del pipe, engines
    gc.collect()
    tail = rows[WARMUP - 1 :] if len(rows) > WARMUP else rows
    growth = (tail[-1]["rss_mib"] - tail[0]["rss_mib"]) / max(len(tail) - 1, 1)
    return {"mode": mode, "videos": rows, "rss_growth_mib_per_video": growth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine_dir", type=Path)
    ap.add_argument("--videos", type=int, default=50)
    ap.add_argument("--modes", default=",".join(MEMORY_POLICIES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=Path("out/soak"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [soak(args.engine_dir, m, args.videos, args.out, args.device) for m in args.modes.split(",")]
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "engine_dir": str(args.engine_dir),
              "torch": torch.__version__, "results": results}  # fmt: skip
    (args.out / "soak.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| mode | videos | RSS after 1st (MiB) | after 3rd | last | growth / video after the 3rd (MiB) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        v = r["videos"]
        third = v[min(WARMUP, len(v)) - 1]["rss_mib"]
        lines.append(f"| {r['mode']} | {len(v)} | {v[0]['rss_mib']:.1f} | {third:.1f} | {v[-1]['rss_mib']:.1f} | "
                     f"{r['rss_growth_mib_per_video']:+.2f} |")  # fmt: skip
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
