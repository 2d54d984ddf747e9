"""Output files: the MP4 has one H.264 yuv420p video stream and one AAC stereo stream with the right fps and
duration (audio and video within one frame of each other); the video encoded in segments decodes to the frames
with a keyframe at each segment's start, falls back to one encoder when the encoders' headers differ, and a failed
segment fails the file; the audio handed over early (`start_audio`, before or after the video) gives the very
file the old order gives, and its failures surface in `finish`; failures leave no file; the raw .npz round-trips;
lab/mp4_tail_probe.py runs."""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from fvrt.metrics import psnr
from fvrt.runtime import media
from fvrt.runtime.media import (
    Mp4Handoff,
    Mp4Writer,
    OutputError,
    check_writable,
    fps_fraction,
    rgb_to_yuv420p,
    save_raw,
    segment_bounds,
)

FRAMES, HEIGHT, WIDTH = 17, 128, 192
AUDIO_LATENTS = 18  # round(17 / 24 * 25): the pipeline's audio length for 17 frames at 24 fps


def smooth_frames(n: int = FRAMES) -> np.ndarray:
    """Moving colour gradients [F, H, W, 3] uint8 (compressible, so the decoded frames can be compared)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    frames = [
        np.stack([(x + 4 * i) / WIDTH, y / HEIGHT, 0.5 + 0.4 * np.sin((x + y + 8 * i) / 40)], axis=-1) * 230
        for i in range(n)
    ]
    return np.clip(frames, 0, 255).astype(np.uint8)


def tone(sample_rate: int) -> np.ndarray:
    """[2, S] float32: two sines, S as the vocoder gives it (4 * latents - 3 mel frames at 100 per second)."""
    n = (4 * AUDIO_LATENTS - 3) * sample_rate // 100
    t = np.arange(n) / sample_rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)


@pytest.mark.parametrize(("fps", "sample_rate"), [(24.0, 48000), (24.0, 24000), (25.0, 48000), (24000 / 1001, 48000)])
def test_mp4_streams_fps_and_duration(tmp_path: Path, fps: float, sample_rate: int) -> None:
    # Precondition
    frames, audio = smooth_frames(), tone(sample_rate)
    path = tmp_path / "out.mp4"

    # Under test
    writer = Mp4Writer(path, fps=fps, width=WIDTH, height=HEIGHT, sample_rate=sample_rate)
    writer.start_video(frames)
    assert writer.finish(audio) == path

    # Postcondition: exactly the output file, with one video and one audio stream
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    with av.open(str(path)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (v.codec_context.width, v.codec_context.height) == (WIDTH, HEIGHT)
        assert v.average_rate == fps_fraction(fps)
        assert a.codec_context.name == "aac" and a.rate == sample_rate
        assert a.codec_context.layout.name == "stereo" and len(a.codec_context.layout.channels) == 2
        video_s, audio_s = float(v.duration * v.time_base), float(a.duration * a.time_base)
        assert video_s == pytest.approx(FRAMES / fps, abs=1e-3)
        assert audio_s == pytest.approx(audio.shape[1] / sample_rate, abs=1e-3)
        assert abs(video_s - audio_s) <= 1 / fps, (video_s, audio_s)
        assert (v.codec_context.colorspace, v.codec_context.color_range) == (1, 1)  # tagged BT.709, limited range
        decoded = np.stack(
            [f.reformat(format="rgb24", src_colorspace="itu709").to_ndarray() for f in c.decode(video=0)]
        )
    assert decoded.shape == frames.shape
    assert psnr(decoded, frames) > 35, "colour order or conversion is off"
    with av.open(str(path)) as c:
        wave = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=-1)
    assert wave.shape[0] == 2
    rms_in, rms_out = np.sqrt((audio**2).mean(axis=1)), np.sqrt((wave**2).mean(axis=1))
    np.testing.assert_allclose(rms_out, rms_in, rtol=0.2)  # left and right keep their own levels


def test_failures_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    # an error while the writer is open (context manager aborts)
    with (
        pytest.raises(ValueError, match="stereo"),
        Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000) as w,
    ):
        w.start_video(smooth_frames(3))
        w.finish(np.zeros((1, 4800), np.float32))  # mono: refused
    assert list(tmp_path.iterdir()) == []
    # an explicit abort after the video was encoded
    w = Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000)
    w.start_video(smooth_frames(3))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    # bad frames are refused before anything is encoded
    with (
        pytest.raises(ValueError, match=r"\[F, H, W, 3\] uint8 RGB or \[F, 3H/2, W\] uint8 yuv420p"),
        Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000) as w,
    ):
        w.start_video(smooth_frames(3).astype(np.float32))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_only_when_complete(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous")
    w = Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000)
    w.start_video(smooth_frames(3))
    assert path.read_bytes() == b"previous"  # still the old file while encoding
    w.finish(tone(48000))
    assert path.read_bytes() != b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_raw_npz_round_trip(tmp_path: Path) -> None:
    frames, audio = smooth_frames(5), tone(24000)
    path = save_raw(tmp_path / "out.npz", frames, audio, sample_rate=24000, fps=24.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    with np.load(path) as raw:
        assert np.array_equal(raw["frames"], frames) and raw["frames"].dtype == np.uint8
        assert np.array_equal(raw["audio"], audio) and raw["audio"].dtype == np.float32
        assert int(raw["sample_rate"]) == 24000 and float(raw["fps"]) == 24.0


def test_check_writable(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "a.mp4", "--output") == tmp_path / "a.mp4"
    with pytest.raises(OutputError, match=r"--output .*: directory .* does not exist"):
        check_writable(tmp_path / "missing" / "a.mp4", "--output")
    with pytest.raises(OutputError, match=r"--raw .*: is a directory"):
        check_writable(tmp_path, "--raw")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(OutputError, match="not writable"):
            check_writable(ro / "a.mp4", "--output")


# Segment-parallel video: 40 frames in 4 segments of 10 (MIN_SEGMENT_FRAMES = 8 allows 5 at most)
SEG_FRAMES, SEGMENTS = 40, 4
# PSNR of the decoded planes against the source, worst frame: the one-encoder path gives 52.2 dB on the whole clip
# and the 4-segment one 52.4 dB (its IDR frames are better); a frame out of place or lost gives under 30 dB
PSNR_BAR = 48.0


@functools.cache  # the CPU conversion takes ~0.5 s; the writers only read the planes
def yuv_frames(n: int = SEG_FRAMES) -> np.ndarray:
    """smooth_frames as the pipeline hands them over: yuv420p planes [F, 3H/2, W] uint8."""
    return rgb_to_yuv420p(torch.from_numpy(smooth_frames(n))).numpy()


def decode_planes(path: Path) -> tuple[np.ndarray, list[int], tuple[Fraction, int, int, float, float]]:
    """The decoded yuv420p planes [F, 3H/2, W] uint8, the keyframes' indices, and (frame rate, width, height, video
    seconds, audio seconds)."""
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
        v = c.streams.video[0]
        facts = (v.average_rate, v.codec_context.width, v.codec_context.height, float(v.duration * v.time_base))
        audio_s = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    planes = np.stack([f.to_ndarray() for f in frames])
    return planes, [i for i, f in enumerate(frames) if f.key_frame], (*facts, audio_s)


def test_segment_bounds() -> None:
    assert segment_bounds(121, 8) == [(0, 15), (15, 30), (30, 45), (45, 60), (60, 76), (76, 91), (91, 106), (106, 121)]
    assert segment_bounds(40, 16) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]  # none under MIN_SEGMENT_FRAMES
    assert segment_bounds(7, 4) == [(0, 7)]
    assert segment_bounds(121, 1) == [(0, 121)]


@pytest.mark.parametrize("segments", [1, SEGMENTS])
def test_segmented_mp4_decodes_to_the_frames(tmp_path: Path, segments: int) -> None:
    # Precondition
    planes, audio = yuv_frames(), tone(48000)
    path = tmp_path / "out.mp4"

    # Under test
    w = Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000, segments=segments, threads=2)
    w.start_video(planes)
    w.finish(audio)

    # Postcondition: every encoder ran (their SPS/PPS agreed), each segment starts with a keyframe, and every frame
    # is where it belongs
    assert w.segments_used == segments
    decoded, keys, (rate, width, height, video_s, audio_s) = decode_planes(path)
    assert decoded.shape == planes.shape
    assert keys == [start for start, _ in segment_bounds(SEG_FRAMES, segments)]
    assert (rate, width, height) == (24, WIDTH, HEIGHT)
    assert video_s == pytest.approx(SEG_FRAMES / 24, abs=1e-3)
    assert audio_s == pytest.approx(audio.shape[1] / 48000, abs=1e-3)
    worst = min(psnr(d, p) for d, p in zip(decoded, planes, strict=True))
    assert worst > PSNR_BAR, worst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_differing_encoder_headers_fall_back_to_one_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Precondition: the second and later segments' encoders tag other colour primaries, so their SPS differ
    new_encoder = Mp4Writer._new_encoder

    def other_sps(self: Mp4Writer) -> av.CodecContext:
        ctx = new_encoder(self)
        ctx.color_primaries = 5  # BT.470BG
        return ctx

    monkeypatch.setattr(Mp4Writer, "_new_encoder", other_sps)
    planes = yuv_frames()
    path = tmp_path / "out.mp4"

    # Under test
    w = Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000, segments=SEGMENTS, threads=1)
    w.start_video(planes)
    w.finish(tone(48000))

    # Postcondition: one encoder made the whole video, and said so
    assert w.segments_used == 1
    assert "disagree on SPS/PPS" in caplog.text
    decoded, keys, _ = decode_planes(path)
    assert keys == [0] and decoded.shape == planes.shape
    assert min(psnr(d, p) for d, p in zip(decoded, planes, strict=True)) > PSNR_BAR


@pytest.mark.parametrize(
    ("error", "raised", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), OutputError, "disk full writing .*out.mp4; nothing was"),
        (RuntimeError("segment 2 failed"), RuntimeError, "segment 2 failed"),
    ],
)
def test_error_in_one_segment_surfaces_in_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, raised: type, message: str
) -> None:
    # Precondition: the encode of the third segment fails (the others succeed)
    encode_segment = media._encode_segment

    def failing(ctx: av.CodecContext, planes: np.ndarray, first: int) -> list[av.Packet]:
        if first == segment_bounds(SEG_FRAMES, SEGMENTS)[2][0]:
            raise error
        return encode_segment(ctx, planes, first)

    monkeypatch.setattr(media, "_encode_segment", failing)
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous")

    # Under test: finish() raises it, as fvrt-run's writer did when its one encoder failed
    with (
        pytest.raises(raised, match=message),
        Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000, segments=SEGMENTS, threads=1) as w,
    ):
        w.start_video(yuv_frames())
        w.finish(tone(48000))

    # Postcondition: no partial file, the older output intact
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("out.mp4", b"previous")]


def test_abort_while_segments_encode_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    w = Mp4Writer(path, fps=24, width=WIDTH, height=HEIGHT, sample_rate=48000, segments=SEGMENTS, threads=1)
    w.start_video(yuv_frames())
    w.abort()  # right away: the encoders are still running
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# the audio handed over early (start_audio)


def audio_facts(path: Path) -> tuple[list[tuple[int, int, int, str, bytes]], tuple[str, int, int], np.ndarray]:
    """The audio stream's packets (pts, dts, duration, time base, bytes), (time base, duration, frames) and the
    decoded waveform."""
    with av.open(str(path)) as c:
        packets = [(p.pts, p.dts, p.duration, str(p.time_base), bytes(p)) for p in c.demux(audio=0) if p.size]
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        stream = (str(a.time_base), a.duration, a.frames)
        wave = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=-1)
    return packets, stream, wave


@pytest.mark.parametrize("sample_rate", [48000, 24000])
@pytest.mark.parametrize("order", ["audio first", "video first"])
def test_start_audio_writes_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str, sample_rate: int
) -> None:
    # Precondition: the file of the old order (start_video, then finish(audio)), and a record of where the AAC runs
    planes, audio = yuv_frames(), tone(sample_rate)
    kw = {"fps": 24, "width": WIDTH, "height": HEIGHT, "sample_rate": sample_rate, "segments": 2, "threads": 1}
    old = Mp4Writer(tmp_path / "old.mp4", **kw)
    old.start_video(planes)
    old.finish(audio)
    threads: list[str] = []
    encode_aac = media._encode_aac

    def recorded(ctx: av.AudioCodecContext, samples: np.ndarray) -> list[av.Packet]:
        threads.append(threading.current_thread().name)
        return encode_aac(ctx, samples)

    monkeypatch.setattr(media, "_encode_aac", recorded)
    path = tmp_path / "new.mp4"

    # Under test
    w = Mp4Writer(path, **kw)
    if order == "audio first":
        w.start_audio(audio)
        w.start_video(planes)
    else:
        w.start_video(planes)
        w.start_audio(audio)
    assert w.finish() == path

    # Postcondition: the AAC ran in its own thread, and the file is the old order's, byte for byte (packets,
    # timestamps in the stream's time base, durations, decoded samples)
    assert threads == ["mp4-audio"]
    assert path.read_bytes() == (tmp_path / "old.mp4").read_bytes()
    packets, stream, wave = audio_facts(path)
    old_packets, old_stream, old_wave = audio_facts(tmp_path / "old.mp4")
    assert packets == old_packets and stream == old_stream and np.array_equal(wave, old_wave)
    assert stream[0] == f"1/{sample_rate}" and packets[0][0] == -1024  # AAC priming: the first frame before 0
    assert float(stream[1]) / sample_rate == pytest.approx(audio.shape[1] / sample_rate, abs=1e-3)
    _, keys, (_, _, _, video_s, _) = decode_planes(path)
    assert keys == [0, SEG_FRAMES // 2] and video_s == pytest.approx(SEG_FRAMES / 24, abs=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.mp4", "old.mp4"]


def test_start_audio_refusals(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    kw = {"fps": 24, "width": WIDTH, "height": HEIGHT, "sample_rate": 48000}
    # the audio twice: in finish() after start_audio()
    with (
        pytest.raises(ValueError, match=r"^the audio went to start_audio\(\) already; call finish\(\) without it$"),
        Mp4Writer(path, **kw) as w,
    ):
        w.start_audio(tone(48000))
        w.start_video(smooth_frames(3))
        w.finish(tone(48000))
    assert list(tmp_path.iterdir()) == []
    # no audio at all
    with pytest.raises(ValueError, match=r"start_audio\(\) was not called"), Mp4Writer(path, **kw) as w:
        w.start_video(smooth_frames(3))
        w.finish()
    assert list(tmp_path.iterdir()) == []
    # mono, refused before any thread starts; start_audio twice
    with Mp4Writer(path, **kw) as w:
        with pytest.raises(ValueError, match="stereo"):
            w.start_audio(np.zeros((1, 4800), np.float32))
        w.start_audio(tone(48000))
        with pytest.raises(RuntimeError, match="called already"):
            w.start_audio(tone(48000))
        w.abort()  # with the AAC possibly still encoding
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("error", "raised", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), OutputError, "disk full writing .*out.mp4; nothing was"),
        (RuntimeError("the AAC failed"), RuntimeError, "the AAC failed"),
    ],
)
@pytest.mark.parametrize("order", ["audio first", "video first"])
def test_error_in_the_audio_thread_surfaces_in_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str, error: Exception, raised: type, message: str
) -> None:
    # Precondition: the AAC encode fails; an older output is there
    def failing(ctx: av.AudioCodecContext, samples: np.ndarray) -> list[av.Packet]:
        raise error

    monkeypatch.setattr(media, "_encode_aac", failing)
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous")
    kw = {"fps": 24, "width": WIDTH, "height": HEIGHT, "sample_rate": 48000}

    # Under test
    with pytest.raises(raised, match=message), Mp4Handoff(path, **kw) as mp4:
        if order == "audio first":
            mp4.on_audio(tone(48000))
            mp4.on_video(yuv_frames())
        else:
            mp4.on_video(yuv_frames())
            mp4.on_audio(tone(48000))
        mp4.finish()

    # Postcondition: no partial file, the older output intact
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("out.mp4", b"previous")]


def test_differing_aac_headers_encode_with_the_streams_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Precondition: the writer's own AAC encoder runs at another rate, so its header differs from the stream's
    new_encoder = Mp4Writer._new_audio_encoder

    def other_rate(self: Mp4Writer) -> av.AudioCodecContext:
        rate, self.sample_rate = self.sample_rate, 44100
        try:
            return new_encoder(self)
        finally:
            self.sample_rate = rate

    kw = {"fps": 24, "width": WIDTH, "height": HEIGHT, "sample_rate": 48000, "segments": 2, "threads": 1}
    old = Mp4Writer(tmp_path / "old.mp4", **kw)
    old.start_video(yuv_frames())
    old.finish(tone(48000))
    monkeypatch.setattr(Mp4Writer, "_new_audio_encoder", other_rate)

    # Under test
    w = Mp4Writer(tmp_path / "new.mp4", **kw)
    w.start_audio(tone(48000))
    w.start_video(yuv_frames())
    w.finish()

    # Postcondition: the stream's own encoder made the audio (after the header), and said so
    assert "AAC encoder's header differs" in caplog.text
    assert (tmp_path / "new.mp4").read_bytes() == (tmp_path / "old.mp4").read_bytes()


def test_handoff_creates_the_writer_at_the_first_hand_over(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    kw = {"fps": 24, "width": WIDTH, "height": HEIGHT, "sample_rate": 48000}
    # nothing handed over: no writer, no file; finish refuses
    mp4 = Mp4Handoff(path, **kw)
    with pytest.raises(RuntimeError, match="without handing over the video frames"):
        mp4.finish()
    mp4.abort()
    assert mp4.writer is None and list(tmp_path.iterdir()) == []
    # the audio alone is not a video
    with pytest.raises(RuntimeError, match="without handing over the video frames"), Mp4Handoff(path, **kw) as mp4:
        mp4.on_audio(tone(48000))
        mp4.finish()
    assert list(tmp_path.iterdir()) == []
    # the audio, then the video: one writer, the file
    mp4 = Mp4Handoff(path, **kw)
    mp4.on_audio(tone(48000))
    writer = mp4.writer
    mp4.on_video(smooth_frames(3))
    assert mp4.writer is writer and mp4.finish() == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    # without on_audio, finish takes the audio as Mp4Writer.finish does
    mp4 = Mp4Handoff(tmp_path / "b.mp4", **kw)
    mp4.on_video(smooth_frames(3))
    assert mp4.finish(tone(48000)) == tmp_path / "b.mp4"


def test_tail_probe_runs_tiny(tmp_path: Path) -> None:
    """lab/mp4_tail_probe.py end to end at a tiny size: its table and its JSON, every writer's MP4 whole."""
    probe = Path(__file__).resolve().parents[1] / "lab" / "mp4_tail_probe.py"
    args = ["--frames", "17", "--height", "64", "--width", "96", "--reps", "1", "--audio-s", "0.5"]
    args += ["--segments", "1,2", "--threads", "1", "--gaps", "sleep", "--video-gap", "0.1", "--out", str(tmp_path)]
    r = subprocess.run([sys.executable, str(probe), *args], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "| Mp4Writer segments=2 threads=1 |" in r.stdout and "| write, faststart |" in r.stdout
    assert "| Mp4Writer default, audio first, gap sleep |" in r.stdout
    res = json.loads((tmp_path / "mp4_tail.json").read_text())
    writers = {**res["writers"], **res["grid"]}
    assert len(writers) == 5 and writers["Mp4Writer segments=2 threads=1"]["keyframes"] == [0, 8]
    assert writers["Mp4Writer default, audio first, gap sleep"]["audio_first"] is True
    assert all(w["frames"] == 17 and w["psnr_db"] > 30 for w in writers.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp4_tail.json"]
    assert res["versions"]["os.cpu_count"] == os.cpu_count()
