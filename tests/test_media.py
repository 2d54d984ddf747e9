"""Output files: the MP4 has one H.264 yuv420p video stream and one AAC stereo stream with the right fps and
duration (audio and video within one frame of each other); failures leave no file; the raw .npz round-trips."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

from fvrt.metrics import psnr
from fvrt.runtime.media import Mp4Writer, OutputError, check_writable, fps_fraction, save_raw

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
