"""scripts/bench.py's bookkeeping, without building anything: every --precisions spelling maps to the official
side's dtype, misspellings end in one line and exit code 2, and the official-vs-fvrt ratios are same-run
arithmetic (compute without the MP4 on both sides, end to end with it on both)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # scripts/ is not a package


@pytest.mark.parametrize(
    ("precisions", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bf16,fp8", torch.bfloat16),
        ("fp8+ft8,bf16", torch.bfloat16),  # the spelling that raised KeyError 'fp8+ft8'
        ("fp8+fa8+ft8", torch.bfloat16),
        ("fp8+ft8+fa8,fp8", torch.bfloat16),
        ("fp8+fa8s+ft8", torch.bfloat16),
        ("nvfp4+ft8", torch.bfloat16),
        ("fp32,bf16", torch.float32),
    ],
)
def test_official_dtype_follows_the_reference_precision_in_every_spelling(precisions: str, dtype: torch.dtype) -> None:
    assert bench.official_dtype(precisions) == dtype


def test_attention_suffixes_pick_the_attention_mode() -> None:
    assert bench.variant("fp8+fa8") == ("fp8", "fp8", "bf16")
    assert bench.variant("fp8+ft8+fa8s") == ("fp8", "fp8s", "fp8")
    assert bench.variant("fp8+ft8+fa4") == ("fp8", "fa4", "fp8")
    assert bench.variant("bf16+fa4") == ("bf16", "fa4", "bf16")
    assert bench.variant("fp8+ft8+sage") == ("fp8", "sage", "fp8")
    assert bench.variant("fp8") == ("fp8", None, "bf16")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("fp8+xx", "'fp8+xx'"),
        ("bf16+ft8", "'bf16+ft8'"),
        ("fp8+ft8+ft8", "'fp8+ft8+ft8'"),
        ("int8", "'int8'"),
        ("fp8+fa8+fa8s", "'fp8+fa8+fa8s'"),
        ("fp8+fa4+fa8", "'fp8+fa4+fa8'"),
        ("fp32+fa4", "'fp32+fa4'"),
        ("fp8+sage+fa4", "'fp8+sage+fa4'"),
    ],
)
def test_a_misspelt_precision_is_one_line_and_exit_2(name: str, why: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.variant(name)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--precisions" in err and why in err, err


def _warm(end_to_end: float, mux: float) -> dict[str, float]:
    return {"end_to_end": end_to_end, "mux": mux}


PRECISIONS = {
    "fp8+ft8": {
        "distilled": {"warm_median": _warm(13.35, 1.22)},
        "realtime": {"warm_median": _warm(9.52, 0.95)},  # not the official pipeline's work: no ratio
        "text_prefetched": {"distilled": _warm(12.50, 1.00), "realtime": _warm(9.00, 0.90)},
    },
    "bf16": {"realtime": {"warm_median": _warm(11.0, 1.0)}},  # its distilled run was skipped: no ratio
}
OFFICIAL = {"compute": 20.30, "mp4": 2.00, "end_to_end": 22.30}


def test_ratios_compare_compute_with_compute_and_end_to_end_with_end_to_end() -> None:
    got = bench.speedups(OFFICIAL, PRECISIONS)
    assert set(got) == {"fp8+ft8 distilled", "fp8+ft8 distilled, text prefetched"}
    d = got["fp8+ft8 distilled"]
    assert d["fvrt_compute_s"] == pytest.approx(12.13) and d["fvrt_end_to_end_s"] == 13.35
    assert d["compute"] == pytest.approx(20.30 / 12.13) and d["end_to_end"] == pytest.approx(22.30 / 13.35)
    p = got["fp8+ft8 distilled, text prefetched"]
    assert p["compute"] == pytest.approx(20.30 / 11.50) and p["end_to_end"] == pytest.approx(22.30 / 12.50)


def test_the_markdown_shows_both_ratios_and_the_official_mp4() -> None:
    stages = dict.fromkeys(("text_encode", "stage_1", "upsample", "stage_2", "video_decode", "audio_decode"), 1.0)
    official = {
        "compute_s": {**stages, "end_to_end": 20.30},
        "mp4_s": 2.00,
        "total_s": OFFICIAL,
        "speedup": bench.speedups(OFFICIAL, PRECISIONS),
    }
    row, ratios = bench.official_rows(official)
    assert row.startswith("| official | distilled |") and "| 2.00 | 22.30 |" in row  # mux column, end to end
    lines = ratios.strip().splitlines()
    assert "compute" in lines[0] and "end to end" in lines[0]
    assert "| official | 20.30 | 22.30 | - | - |" in lines
    assert f"| fp8+ft8 distilled | 12.13 | 13.35 | {20.30 / 12.13:.2f}x | {22.30 / 13.35:.2f}x |" in lines


def test_the_official_mp4_step_writes_video_and_audio_and_reports_its_time(tmp_path: Path) -> None:
    import av
    import oracle

    od = oracle._official_distilled()
    frames = torch.randint(0, 256, (9, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    waveform = torch.rand(2, 16_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    path = tmp_path / "official.mp4"
    seconds = od.encode_mp4(frames, waveform, 16_000, 24.0, path)
    assert seconds > 0
    with av.open(str(path)) as mp4:
        video, audio = mp4.streams.video[0], mp4.streams.audio[0]
        assert (video.codec_context.name, video.width, video.height) == ("h264", 96, 64)
        assert (audio.codec_context.name, audio.sample_rate, audio.channels) == ("aac", 16_000, 2)
        assert sum(1 for _ in mp4.decode(video=0)) == 9


def test_the_official_runs_after_the_reference_and_its_ratios_cover_every_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official side runs right after the first precision (a deadline that cuts the later ones keeps the
    same-run ratio); the ratios written at the end cover the precisions measured after it too."""
    calls: list[str] = []
    timings = {"fp8+ft8": (13.35, 1.22), "fp8+ft8+fa3": (12.00, 1.00)}

    def fake_precision(args, name, res, ref):
        calls.append(name)
        res["precisions"][name] = {"distilled": {"warm_median": _warm(*timings[name])}}

    def fake_official(args, res, ref):
        calls.append("official")
        res["official"] = {"total_s": OFFICIAL, "speedup": bench.speedups(OFFICIAL, res["precisions"])}

    monkeypatch.setattr(bench, "bench_precision", fake_precision)
    monkeypatch.setattr(bench, "bench_official", fake_official)
    monkeypatch.setattr(bench, "table", lambda res: "")
    argv = ["bench.py", "--device", "cpu", "--precisions", "fp8+ft8,fp8+ft8+fa3", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert calls == ["fp8+ft8", "official", "fp8+ft8+fa3"]
    got = json.loads((tmp_path / "bench.json").read_text())["official"]["speedup"]
    assert set(got) == {"fp8+ft8 distilled", "fp8+ft8+fa3 distilled"}
    assert got["fp8+ft8+fa3 distilled"]["compute"] == pytest.approx(20.30 / 11.00)

    # the official side takes the job past its deadline: the later precision is skipped, the ratio stays
    calls.clear()

    def slow_official(args, res, ref):
        fake_official(args, res, ref)
        monkeypatch.setattr(bench, "T0", bench.T0 - 2000)  # as if it had run 2,000 s

    monkeypatch.setattr(bench, "bench_official", slow_official)
    monkeypatch.setattr(sys, "argv", [*argv, "--deadline-s", "1000"])
    bench.main()
    assert calls == ["fp8+ft8", "official"]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["skipped"] == ["fp8+ft8+fa3"] and set(res["official"]["speedup"]) == {"fp8+ft8 distilled"}


def test_the_markdown_shows_a_later_precisions_psnr_against_the_official_pipeline() -> None:
    q = {"min_video_cosine": 0.9998, "min_audio_cosine": 0.9997, "video_psnr_db": 41.0, "audio_snr_db": 30.0}
    res = {"precisions": {}, "presets": [], "quality": {"fp8+ft8+fa3_vs_fp8+ft8": q}}
    assert "official" not in bench.table(res)
    q |= {"video_psnr_db_vs_official": 36.3, "audio_snr_db_vs_official": 28.5}
    assert "against the official pipeline 36.3 dB, audio 28.5 dB" in bench.table(res)


def _official_run(compute: float, frames: int = 7) -> bench.OfficialRun:
    stages = dict.fromkeys(("text_encode", "stage_1", "upsample", "stage_2", "video_decode", "audio_decode"), 1.0)
    return bench.OfficialRun(
        frames=torch.full((2, 4, 4, 3), frames, dtype=torch.uint8),
        audio=torch.zeros(2, 8),
        compute_s={**stages, "end_to_end": compute},
        mp4_s=compute / 10,
        model_build_s={"stage_1": 2.0},
        peak_gpu_GiB=compute,
    )


def test_the_official_side_reports_its_last_run_and_keeps_every_run() -> None:
    """`--official-runs 2`: the first (cold) run is kept in "runs", the second (warm) one is timed and drives the
    ratios; the peak is the highest of all; a run that decodes different output is flagged."""
    runs = iter([_official_run(24.1), _official_run(20.3)])
    logs: list[str] = []
    out, (frames, _) = bench.official_runs(lambda: next(runs), 2, logs.append)
    assert out["total_s"] == {"compute": 20.3, "mp4": pytest.approx(2.03), "end_to_end": pytest.approx(22.33)}
    assert out["runs"] == [{"compute": 24.1, "mp4": pytest.approx(2.41)}, {"compute": 20.3, "mp4": pytest.approx(2.03)}]
    assert out["timed_run"] == "2 of 2 (warm)" and out["identical"] and out["peak_gpu_GiB"] == 24.1
    assert int(frames[0, 0, 0, 0]) == 7 and len(logs) == 2 and "run 1/2: compute 24.10 s" in logs[0]
    out["speedup"] = bench.speedups(out["total_s"], PRECISIONS)
    _, ratios = bench.official_rows(out)
    assert "official: run 2 of 2 (warm) timed; every run's compute + MP4 s: 24.10 + 2.41, 20.30 + 2.03" in ratios
    assert ratios.endswith("identical output")

    runs = iter([_official_run(24.1, frames=7), _official_run(20.3, frames=8)])
    out, _ = bench.official_runs(lambda: next(runs), 2, logs.append)
    assert not out["identical"]
    out["speedup"] = {}
    assert bench.official_rows(out)[1].endswith("OUTPUT DIFFERED between runs")

    out, _ = bench.official_runs(lambda: _official_run(24.1), 1, logs.append)
    assert out["timed_run"] == "1 of 1 (cold: the process's first)" and out["total_s"]["compute"] == 24.1


def test_no_official_run_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["bench.py", "--random", "tiny", "--device", "cpu", "--official-runs", "0"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--official-runs" in err, err
