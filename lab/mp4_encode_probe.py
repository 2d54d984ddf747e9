"""MP4 encoding cost at 1088x1920x121 (issue 6: the MP4 was ~5 s of the 1080p run): x264 presets and threading
(libavcodec's slice threads, PyAV's default, vs frame threads), rgb24 input (swscale converts on the encoding
thread) vs yuv420p planes made beforehand (torch, on the GPU when present), and what getting the planes to the
host costs: the GPU conversion alone, then a copy into fresh pageable memory vs into pinned memory.

    python lab/mp4_encode_probe.py [--frames 121] [--out /tmp/mp4probe] [--threads slice,frame]

Two kinds of content: smooth (gradients moving, mild noise: like real video) and noisy (what random weights
decode to: the x264 worst case). Prints a table last and writes mp4probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import av
import numpy as np
import torch

from fvrt.runtime.media import rgb_to_yuv420p


def content(kind: str, frames: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "noisy":
        return torch.randint(0, 256, (frames, h, w, 3), generator=g, dtype=torch.uint8)
    y = torch.linspace(0, 1, h).view(1, h, 1, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w, 1)
    t = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    c = torch.tensor([0.0, 2.0, 4.0]).view(1, 1, 1, 3)
    img = 0.5 + 0.5 * torch.sin(6.0 * x + 4.0 * y + 3.0 * t + c)
    img = img + 0.02 * torch.randn(frames, h, w, 3, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def encode(
    path: Path, frames: np.ndarray | list[np.ndarray], fmt: str, preset: str, h: int, w: int, threads: str
) -> float:
    t0 = time.perf_counter()
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=24, options={"crf": "18", "preset": preset})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_type = threads.upper()
        for i, f in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(f, format=fmt)
            fr.pts = i
            c.mux(s.encode(fr))
        c.mux(s.encode())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--height", type=int, default=1088)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mp4probe"))
    ap.add_argument("--presets", default="ultrafast,superfast,veryfast")
    ap.add_argument("--threads", default="slice,frame", help="libavcodec thread types to compare")
    ap.add_argument("--inputs", default="rgb24,yuv420p")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, transfer = [], {}

    def timed(fn: object) -> float:
        for _ in range(2):  # second one timed (the first pays CUDA / kernel start and the pinned allocation)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
        return took

    for kind in ("smooth", "noisy"):
        rgb = content(kind, args.frames, args.height, args.width)
        rgb_np = rgb.numpy()
        on_dev = rgb.to(dev)
        yuv = rgb_to_yuv420p(on_dev)
        pinned = torch.empty(yuv.shape, dtype=yuv.dtype, pin_memory=dev.type == "cuda")
        transfer[kind] = {
            "convert_s": timed(lambda: rgb_to_yuv420p(on_dev)),
            "copy_pageable_s": timed(lambda: yuv.cpu()),
            "copy_pinned_s": timed(lambda: pinned.copy_(yuv)),
        }
        print(kind, transfer[kind], flush=True)
        yuv_np = yuv.cpu().numpy()
        planes = list(yuv_np)
        for preset in args.presets.split(","):
            for threads in args.threads.split(","):
                for fmt, data in (("rgb24", rgb_np), ("yuv420p", planes)):
                    if fmt not in args.inputs.split(","):
                        continue
                    path = args.out / f"{kind}_{preset}_{threads}_{fmt}.mp4"
                    t = encode(path, data, fmt, preset, args.height, args.width, threads)
                    rows.append({"content": kind, "preset": preset, "threads": threads, "input": fmt,
                                 "encode_s": t, "mb": path.stat().st_size / 1e6})  # fmt: skip
                    print(rows[-1], flush=True)
    res = {"device": str(dev), "cpus": os.cpu_count(), "transfer": transfer, "rows": rows}
    (args.out / "mp4probe.json").write_text(json.dumps(res, indent=1))
    print(f"\n{args.frames} frames {args.width}x{args.height}, yuv conversion on {dev}, {os.cpu_count()} CPUs")
    print("| content | GPU convert s | + copy, pageable s | + copy, pinned s |\n|---|---|---|---|")
    for kind, t in transfer.items():
        print(f"| {kind} | {t['convert_s']:.3f} | {t['copy_pageable_s']:.3f} | {t['copy_pinned_s']:.3f} |")
    print("\n| content | preset | threads | input | encode s | MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['content']} | {r['preset']} | {r['threads']} | {r['input']} | {r['encode_s']:.2f} | "
              f"{r['mb']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
