"""The MP4 tail (issue 18 item 4): from the last video frame handed to `Mp4Writer.start_video` to the renamed file,
at 1088x1920x121, 24 fps, with 5 s of stereo 48 kHz audio. The `mux` timing of fvrt-run was 0.95-1.22 s on the
16-core H200 host while x264 alone took 0.45-0.57 s; this probe says where the rest goes and what segment-parallel
encoding (runtime/media.py) gives.

    python lab/mp4_tail_probe.py --out DIR [--frames 121 --height 1088 --width 1920 --reps 3]

Variants, each timed --reps times (median, min, max):
- writer: the one-encoder writer as it was before the segments (a copy, below) and the current `Mp4Writer`, both
  in the order the pipeline used to hand over its outputs: construct, `start_video(planes)`, the caller's audio
  decode (--gap s; "sleep" releases the GIL, "busy" holds it in pure Python: the two ends of what the main thread
  does then), `finish(audio)`. And the current `Mp4Writer` as runtime/cli.py drives it now ("audio first"): the
  pipeline decodes the audio first, so construct, `start_audio(audio)`, the video decode (--video-gap s, asleep or
  busy as above; the AAC encodes meanwhile), then the clock starts: `start_video(planes)`, `finish()`.
  `total` is frames available -> renamed file (the target: <= 0.3 s), `mux` is the finish alone (fvrt-run's timing).
- parts: `VideoFrame.from_ndarray` alone; the encode loop alone (no container) with frame threads, slice threads and
  frame threads + tune=zerolatency; writing the encoded packets into the MP4 with the faststart rewrite, without
  it, and with the index space reserved up front (moov_size); the AAC encode (the default twoloop coder and "fast").
- segments: the current `Mp4Writer` over a grid of segment counts x frame threads per segment.
Each MP4 variant also gets its size, keyframe count and PSNR of the decoded planes against the source (Y, U and V
together; --no-psnr skips the decode). Content: deterministic from --seed, codec-realistic (a textured gradient
canvas panning, textured shapes moving across it, a slow brightness change, mild luma noise). Prints a table last
and writes mp4_tail.json to --out; the MP4s are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch

from fvrt.runtime import media
from fvrt.runtime.media import Mp4Writer, fps_fraction, rgb_to_yuv420p

FPS = 24.0
SAMPLE_RATE = 48000
PAN = (2, 4)  # canvas pan in pixels per frame (rows, columns); even, so that the chroma planes pan too
SHAPES = 6
GLOBAL_HEADER = 1 << 22  # AV_CODEC_FLAG_GLOBAL_HEADER (SPS/PPS in extradata, as the MP4 muxer wants)


def _texture(rng: np.random.Generator, h: int, w: int, scale: int) -> torch.Tensor:
    """[h, w] band-limited noise in [0, 1]: random values at 1/scale resolution, upsampled bilinearly."""
    low = torch.from_numpy(rng.random((1, 1, h // scale + 2, w // scale + 2), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return (up - up.min()) / (up.max() - up.min() + 1e-6)


def _canvas(rng: np.random.Generator, h: int, w: int) -> torch.Tensor:
    """[h, w, 3] uint8: smooth colour gradients with some texture."""
    y = torch.linspace(0, 1, h).view(h, 1, 1)
    x = torch.linspace(0, 1, w).view(1, w, 1)
    c = torch.tensor([0.0, 2.1, 4.2]).view(1, 1, 3)
    img = 0.5 + 0.3 * torch.sin(5.0 * x + 3.0 * y + c) + 0.1 * torch.cos(11.0 * x * y + 2 * c)
    img = img + 0.15 * (_texture(rng, h, w, 16).unsqueeze(-1) - 0.5)
    img = img + 0.05 * (_texture(rng, h, w, 3).unsqueeze(-1) - 0.5)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def _planes(rgb: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[h, w, 3] uint8 RGB -> Y [h, w], U and V [h/2, w/2] through media.rgb_to_yuv420p."""
    h, w, _ = rgb.shape
    flat = rgb_to_yuv420p(rgb.unsqueeze(0)).reshape(-1).numpy()
    n, half = h * w, (h // 2, w // 2)
    return flat[:n].reshape(h, w), flat[n : n + n // 4].reshape(half), flat[n + n // 4 :].reshape(half)


def content(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """yuv420p planes [F, 3h/2, w] uint8 (rgb_to_yuv420p's layout) of a synthetic clip, deterministic from seed."""
    rng = np.random.default_rng(seed)
    ch, cw = h + PAN[0] * frames, w + PAN[1] * frames
    cy, cu, cv = _planes(_canvas(rng, ch, cw))
    shapes = []
    for _ in range(SHAPES):
        sh = 2 * int(rng.integers(h // 12, h // 4))
        sw = 2 * int(rng.integers(w // 16, w // 6))
        colour = torch.from_numpy(rng.random(3, dtype=np.float32)).view(1, 1, 3)
        stripes = torch.sin(torch.arange(sw).view(1, sw, 1) * float(rng.uniform(0.2, 0.9)))
        tex = _texture(rng, sh, sw, 4).unsqueeze(-1)
        rgb = ((0.25 + 0.5 * colour) * (0.6 + 0.25 * stripes + 0.3 * tex)).clamp(0, 1) * 255
        yy, xx = np.mgrid[0:sh, 0:sw]
        ellipse = ((yy - sh / 2) / (sh / 2)) ** 2 + ((xx - sw / 2) / (sw / 2)) ** 2 <= 1.0
        mask = ellipse if rng.random() < 0.5 else np.ones_like(ellipse)
        pos = np.array([rng.integers(0, h - sh), rng.integers(0, w - sw)], dtype=np.int64)
        vel = 2 * rng.integers(-4, 5, size=2)
        shapes.append((_planes(rgb.to(torch.uint8)), mask, mask[::2, ::2], pos, vel, (sh, sw)))
    out = np.empty((frames, h * 3 // 2, w), dtype=np.uint8)
    flat = out.reshape(frames, -1)
    n = h * w
    for t in range(frames):
        oy, ox = PAN[0] * t, PAN[1] * t
        y = cy[oy : oy + h, ox : ox + w].astype(np.int16)
        u = cu[oy // 2 : (oy + h) // 2, ox // 2 : (ox + w) // 2].copy()
        v = cv[oy // 2 : (oy + h) // 2, ox // 2 : (ox + w) // 2].copy()
        for (sy, su, sv), mask, mask2, pos, vel, (sh, sw) in shapes:
            py, px = (pos + vel * t) % np.array([h - sh, w - sw])
            py, px = int(py) // 2 * 2, int(px) // 2 * 2
            y[py : py + sh, px : px + sw][mask] = sy[mask]
            u[py // 2 : (py + sh) // 2, px // 2 : (px + sw) // 2][mask2] = su[mask2]
            v[py // 2 : (py + sh) // 2, px // 2 : (px + sw) // 2][mask2] = sv[mask2]
        y += round(3 * math.sin(2 * math.pi * t / 48))  # a slow brightness change
        y += rng.integers(-2, 3, size=y.shape, dtype=np.int16)  # mild luma noise
        flat[t, :n] = np.clip(y, 0, 255).reshape(-1)
        flat[t, n : n + n // 4] = u.reshape(-1)
        flat[t, n + n // 4 :] = v.reshape(-1)
    return out


def tone(seconds: float) -> np.ndarray:
    """[2, S] float32 stereo at SAMPLE_RATE: two tones with a little noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(1)
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(t.size)
    right = 0.2 * np.sin(2 * np.pi * 660 * t) + 0.02 * rng.standard_normal(t.size)
    return np.stack([left, right]).astype(np.float32)


class LegacyMp4Writer:
    """The writer as it was before the segments (runtime/media.py at 56b5847), its timing path unchanged: one x264
    with frame threads (auto count) encodes and muxes in one background thread; finish() encodes the audio after
    joining it. Validation and error handling are left out (they cost no time)."""

    def __init__(self, path: Path, *, fps: float, width: int, height: int, sample_rate: int) -> None:
        self.path, self._tmp = path, path.with_name(f".{path.name}.partial")
        self._container = av.open(str(self._tmp), "w", format="mp4", options=dict(media.MP4_OPTIONS))
        video = self._container.add_stream(media.VIDEO_CODEC, rate=fps_fraction(fps), options=dict(media.VIDEO_OPTIONS))
        video.width, video.height, video.pix_fmt = width, height, media.VIDEO_PIX_FMT
        ctx = video.codec_context
        ctx.thread_type = media.VIDEO_THREADS
        ctx.colorspace, ctx.color_primaries, ctx.color_trc, ctx.color_range = 1, 1, 1, 1
        self._audio = self._container.add_stream(media.AUDIO_CODEC, rate=sample_rate, layout=media.AUDIO_LAYOUT)
        self._video, self.sample_rate = video, sample_rate
        self._thread: threading.Thread | None = None

    def _encode_video(self, frames: np.ndarray) -> None:
        for i, planes in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(planes, format=media.VIDEO_PIX_FMT)
            frame.pts = i
            self._container.mux(self._video.encode(frame))
        self._container.mux(self._video.encode())

    def start_video(self, frames: np.ndarray) -> None:
        self._thread = threading.Thread(target=self._encode_video, args=(frames,), daemon=True)
        self._thread.start()

    def finish(self, audio: np.ndarray) -> Path:
        assert self._thread is not None
        self._thread.join()
        samples = np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=media.AUDIO_LAYOUT)
        frame.sample_rate, frame.pts = self.sample_rate, 0
        self._container.mux(self._audio.encode(frame))
        self._container.mux(self._audio.encode())
        self._container.close()
        self._tmp.replace(self.path)
        return self.path


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def caller_gap(seconds: float, kind: str) -> None:
    """The caller's audio decode between start_video and finish: asleep (GIL free) or pure Python (GIL held)."""
    if kind == "sleep":
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += sum(range(200))


def decode_check(path: Path, planes: np.ndarray, psnr: bool) -> dict:
    """Size, frames, keyframe indices and (if psnr) PSNR of all decoded planes against the source."""
    sq, count, keys = 0.0, 0, []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, f in enumerate(c.decode(s)):
            if f.key_frame:
                keys.append(i)
            if psnr:
                d = (f.to_ndarray().astype(np.int16) - planes[i]).astype(np.float32).ravel()
                sq += float(np.dot(d, d))  # float32 BLAS: exact enough, ~10x faster than an int32 sum
            count = i + 1
    res: dict = {"mb": path.stat().st_size / 1e6, "frames": count, "keyframes": keys}
    if psnr and count:
        mse = sq / (count * planes[0].size)
        res["psnr_db"] = float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
    return res


def time_writer(
    make: Callable[[Path], object],
    path: Path,
    planes: np.ndarray,
    audio: np.ndarray,
    args: argparse.Namespace,
    kind: str,
    audio_first: bool,
) -> dict:
    """--reps times, from the frames' hand-over to the renamed file: construct, start_video, the caller's audio
    decode, finish(audio); or (audio_first, fvrt-run's order now) construct, start_audio, the video decode, and
    then the timed part: start_video, finish()."""
    totals, muxes = [], []
    for _ in range(args.reps):
        if audio_first:
            w = make(path)
            w.start_audio(audio)  # type: ignore[attr-defined]
            caller_gap(args.video_gap, kind)
            t0 = time.perf_counter()
            w.start_video(planes)  # type: ignore[attr-defined]
            t1 = time.perf_counter()
            w.finish()  # type: ignore[attr-defined]
        else:
            t0 = time.perf_counter()
            w = make(path)
            w.start_video(planes)  # type: ignore[attr-defined]
            caller_gap(args.gap, kind)
            t1 = time.perf_counter()
            w.finish(audio)  # type: ignore[attr-defined]
        t2 = time.perf_counter()
        totals.append(t2 - t0)
        muxes.append(t2 - t1)
    res = {"total_s": stats(totals), "mux_s": stats(muxes), "gap": kind, "audio_first": audio_first}
    if hasattr(w, "segments_used"):
        res["segments_used"] = w.segments_used
    return res


def encoder(h: int, w: int, thread_type: str, threads: int, extra: dict[str, str] | None = None) -> av.CodecContext:
    """An unopened x264 set up as the writer's encoders are, then given this thread type and count and options."""
    ctx = av.CodecContext.create(media.VIDEO_CODEC, "w")
    media._setup_video(ctx, fps_fraction(FPS), w, h, threads)
    ctx.thread_type = thread_type
    ctx.options = {**ctx.options, **(extra or {})}
    ctx.flags |= GLOBAL_HEADER
    return ctx


def parts(planes: np.ndarray, audio: np.ndarray, out: Path, args: argparse.Namespace) -> dict:
    """Where the time of the one-encoder path goes, piece by piece."""
    h, w = planes.shape[1] * 2 // 3, planes.shape[2]
    res: dict = {}
    xs = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for p in planes:
            av.VideoFrame.from_ndarray(p, format=media.VIDEO_PIX_FMT)
        xs.append(time.perf_counter() - t)
    res["from_ndarray"] = stats(xs)
    variants = {
        "encode, frame threads (auto)": ("FRAME", 0, None),
        "encode, slice threads (auto)": ("SLICE", 0, None),
        "encode, frame threads (auto), tune=zerolatency": ("FRAME", 0, {"tune": "zerolatency"}),
    }
    packets: list[av.Packet] = []
    for name, (thread_type, n, extra) in variants.items():
        xs = []
        for _ in range(args.reps):
            ctx = encoder(h, w, thread_type, n, extra)
            ctx.open()
            t = time.perf_counter()
            pk = media._encode_segment(ctx, planes, 0)
            xs.append(time.perf_counter() - t)
        res[name] = {**stats(xs), "mb": sum(p.size for p in pk) / 1e6}
        packets = packets or pk  # the frame-threaded encode's: written below
        print(name, res[name], flush=True)
    for coder in ("twoloop", "fast"):
        xs = []
        for _ in range(args.reps):
            a = av.CodecContext.create(media.AUDIO_CODEC, "w")
            a.sample_rate, a.layout, a.format = SAMPLE_RATE, media.AUDIO_LAYOUT, "fltp"
            a.options = {"aac_coder": coder}
            a.open()
            t = time.perf_counter()
            fr = av.AudioFrame.from_ndarray(audio, format="fltp", layout=media.AUDIO_LAYOUT)
            fr.sample_rate, fr.pts = SAMPLE_RATE, 0
            apk = [*a.encode(fr), *a.encode()]
            xs.append(time.perf_counter() - t)
        res[f"aac {coder}"] = stats(xs)
    # the encoded packets (and the last AAC ones) into an MP4 as finish() writes them, both encoders already open:
    # with the faststart rewrite, without it, and with the index space reserved at the front instead
    reserve = str(16384 + 64 * (len(packets) + len(apk)))
    for name, opts in (("faststart", {"movflags": "+faststart"}), ("plain", {}), ("moov_size", {"moov_size": reserve})):
        xs, closes = [], []
        for _ in range(args.reps):
            path = out / f"parts_{name}.mp4"
            with av.open(str(path), "w", format="mp4", options=opts) as c:
                vs = c.add_stream(media.VIDEO_CODEC, rate=fps_fraction(FPS))
                media._setup_video(vs.codec_context, fps_fraction(FPS), w, h, 1)
                vs.codec_context.open()
                aus = c.add_stream(media.AUDIO_CODEC, rate=SAMPLE_RATE, layout=media.AUDIO_LAYOUT)
                aus.codec_context.open()
                c.start_encoding()
                for p in packets:
                    p.stream = vs
                for p in apk:
                    p.stream = aus
                t = time.perf_counter()
                c.mux(packets)
                c.mux(apk)
                t_close = time.perf_counter()
            end = time.perf_counter()
            xs.append(end - t)
            closes.append(end - t_close)
            path.unlink()
        res[f"write, {name}"] = {**stats(xs), "close": stats(closes)}
        print(f"write, {name}", res[f"write, {name}"], flush=True)
    return res


def versions(sample: Path | None) -> dict:
    x264 = None
    if sample is not None:
        with av.open(str(sample)) as c:
            for p in c.demux(video=0):
                m = re.search(rb"x264 - core (\d+)(?: r(\d+) ([0-9a-f]+))?", bytes(p))
                x264 = m.group(0).decode() if m else None
                break
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {
        "os.cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "pyav": av.__version__,
        "ffmpeg": getattr(av, "ffmpeg_version_info", None),
        "libs": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()},
        "x264": x264,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "media.py": media.__file__,
        "defaults": {
            "CPUS": media.CPUS,
            "VIDEO_SEGMENTS": media.VIDEO_SEGMENTS,
            "VIDEO_SEGMENT_THREADS": media.VIDEO_SEGMENT_THREADS,
        },
    }


def writer_runs(planes: np.ndarray, args: argparse.Namespace) -> tuple[dict, dict]:
    """(the old and the current writer at their defaults, the current one also with the audio first, the current
    one over the segments x threads grid): name -> (make(path) -> writer, what the main thread does during the gap,
    whether the audio is handed over first)."""
    h, w = planes.shape[1] * 2 // 3, planes.shape[2]
    kw = {"fps": FPS, "width": w, "height": h, "sample_rate": SAMPLE_RATE}
    first: dict[str, tuple[Callable[[Path], object], str, bool]] = {}
    for kind in args.gaps.split(","):
        first[f"one encoder (before), gap {kind}"] = (lambda p: LegacyMp4Writer(p, **kw), kind, False)
        first[f"Mp4Writer default, gap {kind}"] = (lambda p: Mp4Writer(p, **kw), kind, False)
        first[f"Mp4Writer default, audio first, gap {kind}"] = (lambda p: Mp4Writer(p, **kw), kind, True)
    grid: dict[str, tuple[Callable[[Path], object], str, bool]] = {}
    seen = set()
    for n in (int(x) for x in args.segments.split(",")):
        for t in (int(x) for x in args.threads.split(",")):
            used = len(media.segment_bounds(len(planes), n))
            if (used, t) in seen or used * t > args.max_oversubscribe * media.CPUS:
                continue
            seen.add((used, t))
            grid[f"Mp4Writer segments={used} threads={t}"] = (
                lambda p, n=n, t=t: Mp4Writer(p, **kw, segments=n, threads=t), "sleep", False)  # fmt: skip
    return first, grid


def run_writers(runs: dict, planes: np.ndarray, audio: np.ndarray, args: argparse.Namespace, deadline: float) -> dict:
    """Time each writer and check its MP4 (the first two are kept for the versions); past the deadline, skip."""
    res = {}
    for name, (make, kind, audio_first) in runs.items():
        if time.perf_counter() > deadline:
            res[name] = {"skipped": f"past --budget-s {args.budget_s}"}
            continue
        path = args.out / f"w{len(list(args.out.glob('w*.mp4'))):02d}.mp4"
        r = time_writer(make, path, planes, audio, args, kind, audio_first)
        r.update(decode_check(path, planes, args.psnr))
        r["keyframes"] = r["keyframes"] if len(r["keyframes"]) <= 16 else len(r["keyframes"])
        res[name] = r
        print(name, r, flush=True)
        if not args.keep and path.name not in ("w00.mp4", "w01.mp4"):
            path.unlink()
    return res


def table(res: dict, args: argparse.Namespace) -> None:
    v = res["versions"]
    print(f"\n{args.frames} frames {args.width}x{args.height} @ {FPS:g} fps + {args.audio_s:g} s stereo AAC; "
          f"gap {args.gap} s (audio first: video gap {args.video_gap} s); {v['os.cpu_count']} CPUs "
          f"({v['affinity']} usable), {v['cpu_model']}; PyAV {v['pyav']}, FFmpeg {v['ffmpeg']}, {v['x264']}; "
          f"wall {res['wall_s']:.0f} s")  # fmt: skip
    print("\n| writer | total s, median (min-max) | mux s, median | MB | PSNR dB | keyframes | encoders |")
    print("|---|---|---|---|---|---|---|")
    for name, r in {**res["writers"], **res["grid"]}.items():
        if "skipped" in r:
            print(f"| {name} | skipped | | | | | |")
            continue
        t, m = r["total_s"], r["mux_s"]
        print(f"| {name} | {t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f}) | {m['median']:.3f} | {r['mb']:.1f} | "
              f"{r.get('psnr_db', float('nan')):.2f} | {r['keyframes']} | {r.get('segments_used', 1)} |")  # fmt: skip
    if "parts" in res:
        print("\n| part (one encoder) | s, median (min-max) | MB |\n|---|---|---|")
        for name, r in res["parts"].items():
            mb = f"{r['mb']:.1f}" if "mb" in r else ""
            print(f"| {name} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | {mb} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--height", type=int, default=1088)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--audio-s", type=float, default=5.0)
    ap.add_argument("--gap", type=float, default=0.05, help="the caller's audio decode, s (0.05 on the H100)")
    ap.add_argument("--video-gap", type=float, default=1.1, help="the video decode, s (1.1 on the H100 at 1080p)")
    ap.add_argument("--gaps", default="sleep,busy", help="what the main thread does meanwhile")
    ap.add_argument("--segments", default="1,2,4,8,16")
    ap.add_argument("--threads", default="1,2,3", help="x264 frame threads per segment")
    ap.add_argument("--max-oversubscribe", type=float, default=3.0, help="skip segments x threads above this x CPUs")
    ap.add_argument("--budget-s", type=float, default=80.0, help="grid variants not started past this are skipped")
    ap.add_argument("--no-parts", dest="parts", action="store_false")
    ap.add_argument("--no-psnr", dest="psnr", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the MP4s")
    args = ap.parse_args()
    if not hasattr(media, "segment_bounds"):
        raise SystemExit(f"{media.__file__} predates the segmented Mp4Writer: install this tree's fvrt first")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    planes = content(args.frames, args.height, args.width, args.seed)
    audio = tone(args.audio_s)
    res: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "content_s": time.perf_counter() - t0}
    print(f"content {planes.shape} in {res['content_s']:.1f} s", flush=True)
    first, grid = writer_runs(planes, args)
    res["writers"] = run_writers(first, planes, audio, args, math.inf)
    res["versions"] = versions(args.out / "w00.mp4")
    if args.parts:
        res["parts"] = parts(planes, audio, args.out, args)
    res["grid"] = run_writers(grid, planes, audio, args, t0 + args.budget_s)
    if not args.keep:
        for name in ("w00.mp4", "w01.mp4"):
            (args.out / name).unlink(missing_ok=True)
    res["wall_s"] = time.perf_counter() - t0
    (args.out / "mp4_tail.json").write_text(json.dumps(res, indent=1))
    table(res, args)


if __name__ == "__main__":
    main()
