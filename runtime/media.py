"""Output files: the MP4 (H.264 yuv420p + AAC stereo, through PyAV) and the raw `.npz`.

Every file is written to a temporary name in its destination directory and renamed into place only when it
is complete, so a failure never leaves a partial output. `Mp4Writer` encodes the video frames in a background
thread, as contiguous segments in parallel (one x264 encoder each, every segment starting with an IDR frame, their
packets muxed in order into the one H.264 stream), and the AAC in another background thread from the moment it
gets the waveform (`start_audio`: the pipeline hands the audio over before it decodes the video, so the AAC is done
before the last frame). `Mp4Handoff` is the pipeline's two callbacks writing one MP4.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import logging
import os
import re
import tempfile
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from fvrt.runtime.scratch import OWNER_RE, owner_tag, remove_stale

VIDEO_CODEC = "libx264"
VIDEO_PIX_FMT = "yuv420p"  # 4:2:0, what browsers play
# crf 18: near-transparent. `ultrafast`: 121 frames at 1080p in 0.9-1.3 s on the H100 host vs 2.8-4.2 s `veryfast`
# and 2.3-3.3 s `superfast` (lab/mp4_encode_probe.py, docs/benchmarks.md); files ~1.5x larger
VIDEO_OPTIONS = {"crf": "18", "preset": "ultrafast"}
# RGB -> Y'CbCr: BT.709 matrix, limited ("tv") range, 2x2-averaged chroma, tagged in the stream so players agree
BT709 = (0.2126, 0.0722)  # Kr, Kb
# x264 threads: frame threading (PyAV's default is slice threading; a whole clip is encoded at once, so the
# latency of frame threads costs nothing; lab/mp4_encode_probe.py compares them)
VIDEO_THREADS = "FRAME"
# The cores this process may run on (a container or taskset may allow fewer than os.cpu_count())
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# Segment-parallel H.264: independent encoders on contiguous segments (one IDR frame each), side by side. On the
# 16-core H100 host (lab/mp4_tail_probe.py, 2026-12-06, docs/results/2026-12-06-h100-mp4-tail.md) every layout
# that uses the cores finished 121 frames at 1080p + 5 s of AAC in 0.41-0.47 s (median of 3, spread ~0.05 s):
# one encoder with x264's own frame threads 0.426 s, 4 segments x 3 threads 0.411 s, 8 x 2 0.465 s; the encode
# itself is ~0.29 s and AAC ~0.22 s of it. Segments gain nothing measurable there, so few are used: 4 x 3 on
# 16 cores (the fastest measured, within the spread), one encoder on small machines (2 cores: 1.47-1.85 s for
# every layout, noisy).
VIDEO_SEGMENTS = max(1, min(4, CPUS // 4))
VIDEO_SEGMENT_THREADS = max(1, min(3, CPUS // VIDEO_SEGMENTS))
MIN_SEGMENT_FRAMES = 8  # shorter segments would pay an IDR frame every few frames for little time
YUV_CHUNK = 8  # frames converted at once (bounds the fp32 temporaries: 8 x 1088 x 1920 x 3 x 4 B = 200 MB)
AUDIO_CODEC = "aac"
AUDIO_LAYOUT = "stereo"
MP4_OPTIONS = {"movflags": "+faststart"}  # index at the front: playback starts before the download ends
FPS_MAX_DENOMINATOR = 1001  # 23.976 = 24000/1001, 29.97 = 30000/1001


log = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output path cannot be written; the message names the flag, the path and the reason."""


# `.NAME.<host>.<pid>.partial`: an output being written (renamed to NAME when complete)
PARTIAL_RE = re.compile(rf"\..+\.{OWNER_RE}\.partial")


def check_writable(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output path that cannot be written: its directory missing, not a directory or
    read-only, the path a directory, or a folder where no file can be created (/proc, /sys: a probe file is
    created and removed). Removes the partial outputs that dead processes of this host left in that folder."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory")
    if not parent.exists():
        raise OutputError(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"{flag} {path}: not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create files in {parent} ({e.strerror or e})") from None
    remove_stale(parent, PARTIAL_RE)
    return path


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.{owner_tag()}.partial")


def write_error(e: BaseException, path: Path) -> OutputError | None:
    """The one-line OutputError for a failed write of `path` (disk full, quota, I/O error), or None when `e` is
    not a write failure. PyAV raises its own OSError subclasses, which carry the errno too."""
    if not isinstance(e, OSError) or e.errno is None:
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full writing {path}; nothing was written")
    return OutputError(f"cannot write {path}: {e.strerror or e}; nothing was written")


def rgb_to_yuv420p(rgb: torch.Tensor) -> torch.Tensor:
    """[F, H, W, 3] uint8 RGB -> [F, 3H/2, W] uint8 planes in PyAV's yuv420p array layout (Y rows, then U, then V
    flattened at half width and height), on rgb's device. H and W must be even."""
    f, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs an even height and width, got {h}x{w}")
    kr, kb = BT709
    out = torch.empty((f, h * 3 // 2, w), dtype=torch.uint8, device=rgb.device)
    flat = out.view(f, -1)
    for i in range(0, f, YUV_CHUNK):
        x = rgb[i : i + YUV_CHUNK].float() / 255.0
        r, g, b = x.unbind(-1)
        y = kr * r + (1.0 - kr - kb) * g + kb * b
        cb = ((b - y) / (2.0 * (1.0 - kb))).unflatten(1, (h // 2, 2)).unflatten(3, (w // 2, 2)).mean((2, 4))
        cr = ((r - y) / (2.0 * (1.0 - kr))).unflatten(1, (h // 2, 2)).unflatten(3, (w // 2, 2)).mean((2, 4))
        n = y.shape[0]
        planes = (16.0 + 219.0 * y, 128.0 + 224.0 * cb, 128.0 + 224.0 * cr)
        flat[i : i + n] = torch.cat([p.reshape(n, -1) for p in planes], dim=1).round_().clamp_(0, 255).to(torch.uint8)
    return out


def fps_fraction(fps: float) -> Fraction:
    """The frame rate as the exact fraction the container stores (24 -> 24/1, 23.976 -> 24000/1001)."""
    return Fraction(fps).limit_denominator(FPS_MAX_DENOMINATOR)


def segment_bounds(frames: int, segments: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) frame ranges covering `frames`: at most `segments`, none shorter than
    MIN_SEGMENT_FRAMES (one range for a short clip), their lengths within one frame of each other."""
    n = max(1, min(segments, frames // MIN_SEGMENT_FRAMES))
    cuts = [round(k * frames / n) for k in range(n + 1)]
    return list(itertools.pairwise(cuts))


def _setup_video(ctx: av.CodecContext, rate: Fraction, width: int, height: int, threads: int) -> None:
    """Configure an unopened libx264 context; every segment's encoder gets exactly these settings, so that their
    SPS/PPS (the stream's extradata) are identical."""
    ctx.width, ctx.height, ctx.pix_fmt = width, height, VIDEO_PIX_FMT
    ctx.framerate, ctx.time_base = rate, 1 / rate
    # PyAV add_stream's defaults (CodecContext.create's differ): constant quality, no bitrate target
    ctx.bit_rate, ctx.bit_rate_tolerance = 0, 128000
    ctx.options = dict(VIDEO_OPTIONS)
    ctx.thread_type, ctx.thread_count = VIDEO_THREADS, threads
    ctx.colorspace, ctx.color_primaries, ctx.color_trc, ctx.color_range = 1, 1, 1, 1  # BT.709 limited range, as
    # rgb_to_yuv420p converts (H.264 VUI, read by players)


def _encode_segment(ctx: av.CodecContext, planes: np.ndarray, first: int) -> list[av.Packet]:
    """Encode yuv420p planes [n, 3H/2, W] uint8 as frames first..first+n-1 with an open encoder, flushed; the
    packets in decoding order."""
    packets: list[av.Packet] = []
    for i, plane in enumerate(planes):
        frame = av.VideoFrame.from_ndarray(plane, format=VIDEO_PIX_FMT)
        frame.pts = first + i
        packets += ctx.encode(frame)  # PyAV releases the GIL in avcodec_send_frame / avcodec_receive_packet
    packets += ctx.encode()
    return packets


def _setup_audio(ctx: av.AudioCodecContext, sample_rate: int) -> None:
    """Configure an unopened AAC context; the stream's and the writer's own encoder get exactly these settings (what
    PyAV's add_stream gives an audio stream, set explicitly rather than left to either constructor's defaults), so
    that their headers (AudioSpecificConfig) and packets are identical."""
    ctx.sample_rate, ctx.layout, ctx.format = sample_rate, AUDIO_LAYOUT, "fltp"
    ctx.bit_rate, ctx.bit_rate_tolerance = 0, 32000
    ctx.time_base = Fraction(1, sample_rate)


def _encode_aac(ctx: av.AudioCodecContext, samples: np.ndarray) -> list[av.Packet]:
    """The AAC packets of a whole waveform [2, S] float32 from an open encoder (PyAV re-frames it to the encoder's
    frame size), flushed: from pts 0, in the codec's time base 1/sample_rate (the muxer rebases them to the
    stream's)."""
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=AUDIO_LAYOUT)
    frame.sample_rate, frame.pts = ctx.sample_rate, 0
    return [*ctx.encode(frame), *ctx.encode()]  # PyAV releases the GIL in avcodec_send_frame


class Mp4Writer:
    """One MP4 with one H.264 and one AAC stream. Call `start_video(frames)` and `start_audio(audio)` (either order),
    then `finish()`; or `start_video(frames)`, then `finish(audio)`. On any error call `abort()` (the context manager
    does), which removes the temporary file.

    Threads: the video thread opens the x264 encoders, writes the container's header (the partial file exists from
    then on) and encodes. The header reads the parameters of both streams' codec contexts, so the AAC is encoded by
    an encoder of the writer's own, set up as the audio stream's (whose context is opened but never encodes): the
    audio thread, or `finish(audio)`, never shares a context with the header. Should the two AAC headers differ,
    `finish` encodes the audio again with the stream's own encoder, after the header, with a warning.

    The video is encoded as up to `segments` contiguous segments (default VIDEO_SEGMENTS), each by its own x264
    with `threads` frame threads (default VIDEO_SEGMENT_THREADS), concurrently; segment 0's encoder is the stream's
    own. Each segment starts with an IDR frame. Should the encoders' SPS/PPS differ, one encoder (segment 0's)
    encodes the whole clip instead, with a warning; `segments_used` says which happened."""

    def __init__(
        self,
        path: str | Path,
        *,
        fps: float,
        width: int,
        height: int,
        sample_rate: int,
        segments: int = VIDEO_SEGMENTS,
        threads: int = VIDEO_SEGMENT_THREADS,
    ) -> None:
        if segments < 1 or threads < 1:
            raise ValueError(f"segments and threads must be >= 1, got {segments} and {threads}")
        self.path = Path(path)
        self._tmp = _partial(self.path)
        try:
            self._container = av.open(str(self._tmp), "w", format="mp4", options=MP4_OPTIONS)
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            raise write_error(e, self.path) or e from None
        self._closed = False
        self._rate = fps_fraction(fps)
        video = self._container.add_stream(VIDEO_CODEC, rate=self._rate)
        _setup_video(video.codec_context, self._rate, width, height, threads)
        audio = self._container.add_stream(AUDIO_CODEC, rate=sample_rate, layout=AUDIO_LAYOUT)
        _setup_audio(audio.codec_context, sample_rate)
        audio.codec_context.open()  # its AudioSpecificConfig, which the writer's own AAC encoder is checked against
        self._video, self._audio, self.sample_rate = video, audio, sample_rate
        self.width, self.height = width, height
        self.segments, self.threads = segments, threads
        self.segments_used = 0  # encoders that made the video: set by the encoding thread
        self._packets: list[av.Packet] = []  # the video's, in decoding order
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._audio_packets: list[av.Packet] = []
        self._audio_thread: threading.Thread | None = None
        self._audio_error: BaseException | None = None
        self._audio_again: np.ndarray | None = None  # samples for the stream's own encoder (headers differed)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def _new_encoder(self) -> av.CodecContext:
        """An unopened encoder for one more segment, set up as the stream's."""
        ctx = av.CodecContext.create(VIDEO_CODEC, "w")
        _setup_video(ctx, self._rate, self.width, self.height, self.threads)
        ctx.flags = self._video.codec_context.flags  # GLOBAL_HEADER (add_stream sets it for MP4): SPS/PPS out of band
        return ctx

    def _open_encoders(self, n: int) -> list[av.CodecContext]:
        """Segment 0's encoder (the stream's) and n - 1 more, open; only the first when their SPS/PPS differ."""
        encoders = [self._video.codec_context, *(self._new_encoder() for _ in range(n - 1))]
        for ctx in encoders:
            ctx.open()
        headers = {ctx.extradata for ctx in encoders}
        if len(headers) > 1:
            log.warning("x264 segment encoders disagree on SPS/PPS; encoding the video with one encoder")
            return encoders[:1]
        return encoders

    def _encode_video(self, frames: np.ndarray) -> None:
        try:
            if frames.ndim == 4:  # RGB: converted here, in chunks, with the same arithmetic as on the GPU
                frames = rgb_to_yuv420p(torch.from_numpy(frames)).numpy()
            bounds = segment_bounds(len(frames), self.segments)
            encoders = self._open_encoders(len(bounds))
            if len(encoders) == 1:
                bounds = [(0, len(frames))]
            self.segments_used = len(encoders)
            self._container.start_encoding()  # the header: the partial file exists while the video encodes
            parts = self._encode_segments(encoders, frames, bounds)
            packets = [p for part in parts for p in part]
            for p in packets:
                p.stream = self._video
            dts = [p.dts for p in packets]
            if any(b <= a for a, b in itertools.pairwise(dts)):  # x264 ultrafast has no B-frames: dts == pts
                raise RuntimeError(f"H.264 segments do not join in decoding order (dts {dts})")
            self._packets = packets
        except BaseException as e:  # re-raised by finish() in the caller's thread
            self._error = e

    def _encode_segments(
        self, encoders: list[av.CodecContext], frames: np.ndarray, bounds: list[tuple[int, int]]
    ) -> list[list[av.Packet]]:
        """Each segment's packets; segment 0 on this thread, the others on threads of their own. The first error
        (in segment order) is raised once all have stopped."""
        parts: list[list[av.Packet]] = [[] for _ in bounds]
        errors: list[BaseException | None] = [None] * len(bounds)

        def run(k: int) -> None:
            start, end = bounds[k]
            try:
                parts[k] = _encode_segment(encoders[k], frames[start:end], start)
            except BaseException as e:
                errors[k] = e

        workers = [threading.Thread(target=run, args=(k,), name=f"mp4-video-{k}") for k in range(1, len(bounds))]
        for w in workers:
            w.start()
        run(0)
        for w in workers:
            w.join()
        for e in errors:
            if e is not None:
                raise e
        return parts

    @staticmethod
    def _audio_frame(audio: np.ndarray) -> np.ndarray:
        """The waveform [2, S] as the encoder's input: float32, clipped to [-1, 1], a copy of its own."""
        if audio.ndim != 2 or audio.shape[0] != 2:
            raise ValueError(f"audio must be stereo [2, S], got {audio.shape}")
        return np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)

    def _new_audio_encoder(self) -> av.AudioCodecContext:
        """An open AAC encoder of the writer's own, set up as the audio stream's."""
        ctx = av.CodecContext.create(AUDIO_CODEC, "w")
        _setup_audio(ctx, self.sample_rate)
        ctx.flags = self._audio.codec_context.flags  # GLOBAL_HEADER (add_stream sets it for MP4)
        ctx.open()
        return ctx

    def _encode_audio(self, samples: np.ndarray) -> None:
        """The AAC packets, with the writer's own encoder; the stream's context is only read (its header)."""
        try:
            ctx = self._new_audio_encoder()
            if ctx.extradata != self._audio.codec_context.extradata:
                log.warning("the AAC encoder's header differs from the stream's; the audio is encoded at finish")
                self._audio_again = samples
                return
            self._audio_packets = _encode_aac(ctx, samples)
        except BaseException as e:  # re-raised by finish() in the caller's thread
            self._audio_error = e

    @property
    def video_started(self) -> bool:
        return self._thread is not None

    def start_audio(self, audio: np.ndarray) -> None:
        """Encode the waveform [2, S] float (clipped to [-1, 1]; copied here, so the caller may reuse its array) as
        AAC in a background thread, before or after `start_video`. `finish()` then takes no audio."""
        if self._audio_thread is not None:
            raise RuntimeError("start_audio() was called already")
        samples = self._audio_frame(audio)
        self._audio_thread = threading.Thread(target=self._encode_audio, args=(samples,), name="mp4-audio", daemon=True)
        self._audio_thread.start()

    def start_video(self, frames: np.ndarray) -> None:
        """Encode RGB frames [F, H, W, 3] uint8, or `rgb_to_yuv420p` planes [F, 3H/2, W] uint8 (what the pipeline
        hands over, converted on the GPU), in a background thread, before or after `start_audio`."""
        rgb = (self.height, self.width, 3)
        yuv = (self.height * 3 // 2, self.width)
        if frames.dtype != np.uint8 or tuple(frames.shape[1:]) not in (rgb, yuv):
            raise ValueError(
                f"video frames must be [F, H, W, 3] uint8 RGB or [F, 3H/2, W] uint8 yuv420p planes for "
                f"{self.width}x{self.height}, got {frames.shape} {frames.dtype}"
            )
        if self._thread is not None:
            raise RuntimeError("start_video() was called already")
        self._thread = threading.Thread(target=self._encode_video, args=(frames,), name="mp4-video", daemon=True)
        self._thread.start()

    def finish(self, audio: np.ndarray | None = None) -> Path:
        """Wait for the encoders, then write both streams after the header, close the file and rename it into
        place. `audio`: the waveform [2, S] float (clipped to [-1, 1]) when `start_audio` was not called, encoded
        here while the video may still be encoding; None (and only None: a ValueError otherwise) after
        `start_audio`. An error of an encoding thread is raised here, in the caller's thread; a failed write (disk
        full) removes the partial file and is an OutputError."""
        if self._thread is None:
            raise RuntimeError("start_video() must be called before finish()")
        if self._audio_thread is None:
            if audio is None:
                raise ValueError("finish() needs the audio: start_audio() was not called")
            self._encode_audio(self._audio_frame(audio))
        elif audio is not None:
            raise ValueError("the audio went to start_audio() already; call finish() without it")
        else:
            self._audio_thread.join()
        self._thread.join()
        try:
            for error in (self._error, self._audio_error):
                if error is not None:
                    raise error
            if self._audio_again is not None:  # the video thread has written the header: the context is free
                self._audio_packets = _encode_aac(self._audio.codec_context, self._audio_again)
            for p in self._audio_packets:
                p.stream = self._audio
            self._container.mux(self._packets)  # the muxer interleaves them with the audio by time
            self._container.mux(self._audio_packets)
            self._closed = True
            self._container.close()
            self._tmp.replace(self.path)
        except OSError as e:  # disk full, quota, I/O error: the partial file goes, an older output stays intact
            self.abort()
            raise write_error(e, self.path) or e from None
        return self.path

    def abort(self) -> None:
        """Wait for the encoding threads, close the container and remove the partial file."""
        for thread in (self._thread, self._audio_thread):
            if thread is not None:
                thread.join()
        if not self._closed:
            self._closed = True
            with contextlib.suppress(av.FFmpegError, OSError, ValueError):  # half-written; deleted next
                self._container.close()
        self._tmp.unlink(missing_ok=True)


class Mp4Handoff:
    """The pipeline's `on_audio` and `on_video` callbacks writing one MP4 (as fvrt-run, the server and the bench
    drive it): the `Mp4Writer` is created at the first hand-over, whichever comes first, and each stream starts
    encoding in the background when it is handed over. `finish()` writes the file (a RuntimeError if the video never
    came); `abort()` (the context manager calls it on an error) removes the partial file, if one was started."""

    def __init__(self, path: str | Path, *, fps: float, width: int, height: int, sample_rate: int) -> None:
        self.path = Path(path)
        self._kwargs = {"fps": fps, "width": width, "height": height, "sample_rate": sample_rate}
        self.writer: Mp4Writer | None = None

    def __enter__(self) -> Mp4Handoff:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def _writer(self) -> Mp4Writer:
        if self.writer is None:
            self.writer = Mp4Writer(self.path, **self._kwargs)
        return self.writer

    def on_audio(self, audio: np.ndarray) -> None:
        self._writer().start_audio(audio)

    def on_video(self, planes: np.ndarray) -> None:
        self._writer().start_video(planes)

    def finish(self, audio: np.ndarray | None = None) -> Path:
        """`Mp4Writer.finish`: `audio` only when the pipeline ran without `on_audio`."""
        if self.writer is None or not self.writer.video_started:
            raise RuntimeError("the pipeline returned without handing over the video frames")
        return self.writer.finish(audio)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def save_raw(path: str | Path, frames: np.ndarray, audio: np.ndarray, *, sample_rate: int, fps: float) -> Path:
    """`.npz` with frames [F, H, W, 3] uint8, audio [2, S] float32, sample_rate and fps (for exact comparison)."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, frames=frames, audio=audio.astype(np.float32), sample_rate=sample_rate, fps=fps)
    _write_atomic(path, buf.getvalue())
    return path


def write_atomic(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary name."""
    path = Path(path)
    _write_atomic(path, text.encode())
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` through a temporary name; a failed write (disk full) is an OutputError and leaves no file."""
    tmp = _partial(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        raise write_error(e, path) or e from None
    finally:
        tmp.unlink(missing_ok=True)
