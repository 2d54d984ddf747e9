"""`fvrt-run`: a run writes the MP4, the raw .npz and the timings; every bad request exits 2 with one line on
stderr and writes nothing.

The engine directory here has a real manifest (profiles, config) and tokenizer folder; the engines themselves are
the eager reference set (the compiled engines have their own tests), swapped in for `open_engines`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from official_pipeline import TinyRelease, tiny_release

from fvrt.builder.checkpoint import ModelVersion
from fvrt.builder.eager import EagerEngineSet
from fvrt.builder.engines import PRESET_PROFILES
from fvrt.runtime import cli
from fvrt.runtime.manifest import FORMAT_VERSION, BuildEnv, Manifest, StageEntry, write_manifest
from fvrt.runtime.pipeline import BLOCK_PREFIX, IMAGE_ENGINES, PIPELINE_ENGINES, Pipeline, Request
from fvrt.runtime.tokenizer import PromptTokenizer

TINY = PRESET_PROFILES["tiny"]
PROMPT = "A cat sits on a red mat."


class Setup(NamedTuple):
    release: TinyRelease
    engine_dir: Path


def _manifest(config: dict, stages: dict[str, StageEntry] | None = None) -> Manifest:
    profile = {k: v for k, v in TINY._asdict().items() if k != "name"}
    env = BuildEnv(
        fvrt_version="0.1.0",
        torch_version=torch.__version__,
        tensorrt_version=None,
        gpu_name=None,
        compute_capability=None,
        model_version="2.0",
        checkpoint_sha256=None,
    )
    return Manifest(
        format_version=FORMAT_VERSION, profiles={TINY.name: profile}, stages=stages or {}, build=env, config=config
    )


# every engine the pipeline runs (the block engine under its plain name), as a manifest lists them
ENGINES = (*PIPELINE_ENGINES, BLOCK_PREFIX, *IMAGE_ENGINES)


def _entries(names: Sequence[str] = ENGINES, sha256: Callable[[str], str] = lambda _: "0" * 64) -> dict:
    return {n: StageEntry(n, "torch-aot", f"{n}.pt2", sha256(n), "fp32", [], []) for n in names}


@pytest.fixture(scope="module")
def setup(module_tmp: Callable[[str], Path]) -> Setup:
    """A tiny release and an engine directory whose manifest lists every engine (the files are not there: the
    tests swap the eager set in for `open_engines`, which would hash them)."""
    root = module_tmp("cli")
    release = tiny_release(root / "release", ModelVersion.LTX2)
    engine_dir = root / "engines"
    engine_dir.mkdir()
    write_manifest(engine_dir, _manifest(release.checkpoint.config, _entries()))
    shutil.copytree(release.tokenizer, engine_dir / "tokenizer")
    return Setup(release, engine_dir)


@pytest.fixture
def eager_engines(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str | None]]:
    """`open_engines` returns the eager set; records its calls."""
    calls: list[tuple[Path, str | None]] = []

    def fake(engine_dir: Path, device: str | None) -> EagerEngineSet:
        calls.append((engine_dir, device))
        return EagerEngineSet(setup.release.checkpoint, [TINY])

    monkeypatch.setattr(cli, "open_engines", fake)
    return calls


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_run_writes_mp4_raw_and_timings(setup: Setup, eager_engines: list, tmp_path: Path) -> None:
    # Under test
    out = tmp_path / "clip.mp4"
    result = invoke(
        setup.engine_dir, "--prompt", PROMPT, "--image", setup.release.image, "--seed", "5", "--preset", "realtime",
        "--output", out, "--raw", tmp_path / "clip.npz", "--timings", tmp_path / "t.json",
    )  # fmt: skip

    # Postcondition: the three files and nothing else; shape defaults came from the manifest
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip.npz", "t.json"]
    assert eager_engines == [(setup.engine_dir, None)]
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.width, v.codec_context.height, v.average_rate) == (TINY.width, TINY.height, 24)
        assert (v.codec_context.pix_fmt, a.codec_context.name, a.rate) == ("yuv420p", "aac", 24000)
        assert sum(1 for _ in c.decode(video=0)) == TINY.frames
    # the raw output is exactly what the library call gives
    req = Request(
        PROMPT, TINY.height, TINY.width, TINY.frames, TINY.fps, seed=5, preset="realtime", image=setup.release.image
    )
    ref = Pipeline(EagerEngineSet(setup.release.checkpoint, [TINY]), PromptTokenizer(setup.release.tokenizer))(req)
    with np.load(tmp_path / "clip.npz") as raw:
        assert np.array_equal(raw["frames"], ref.frames) and np.array_equal(raw["audio"], ref.audio)
        assert int(raw["sample_rate"]) == 24000 and float(raw["fps"]) == 24.0
    record = json.loads((tmp_path / "t.json").read_text())
    stages = ("text_encode", "stage_1", "upsample", "stage_2", "video_decode", "frames_out", "audio_decode", "mux")
    stages += ("total",)
    assert all(record["timings_s"][s] >= 0 for s in stages)
    assert record["request"]["steps"] == [5, 2] and record["request"]["seed"] == 5
    assert all(s in result.stdout for s in stages), "timing report printed"


class Bad(NamedTuple):
    args: tuple[str, ...]  # "{engines}", "{out}", "{tmp}" are substituted
    message: str


BAD = {
    "engine_dir_missing": Bad(("{tmp}/nope",), "engine directory not found"),
    "not_an_engine_dir": Bad(("{tmp}",), "is not an engine directory"),
    "frames_not_8k1": Bad(("{engines}", "--frames", "20"), "--frames 20: must be 8k+1"),
    "height_not_64": Bad(("{engines}", "--height", "100"), "--height 100: must be a positive multiple of 64"),
    "width_not_64": Bad(("{engines}", "--width", "200"), "--width 200: must be a positive multiple of 64"),
    "shape_not_built": Bad(("{engines}", "--frames", "25"), "the engines were not built for this shape"),
    "fps_not_built": Bad(("{engines}", "--fps", "30"), "the engines were not built for this shape"),
    "empty_prompt": Bad(("{engines}", "--prompt", "   "), "--prompt: the prompt is empty"),
    "unreadable_image": Bad(("{engines}", "--image", "{tmp}/bad.png"), "cannot read the image"),
    "missing_image": Bad(("{engines}", "--image", "{tmp}/none.png"), "cannot read the image"),
    "output_dir_missing": Bad(("{engines}", "--output", "{out}/no/x.mp4"), "does not exist"),
    "output_is_dir": Bad(("{engines}", "--output", "{out}"), "is a directory"),
    "raw_dir_missing": Bad(("{engines}", "--raw", "{out}/no/x.npz"), "--raw"),
    "same_paths": Bad(("{engines}", "--raw", "{out}/x.mp4", "--output", "{out}/x.mp4"), "its own path"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_requests_exit_2_and_write_nothing(setup: Setup, eager_engines: list, tmp_path: Path, case: str) -> None:
    # Precondition: an empty output directory, a corrupt image
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    bad = BAD[case]
    args = [a.format(engines=setup.engine_dir, out=out, tmp=tmp_path) for a in bad.args]
    if "--prompt" not in args:
        args += ["--prompt", PROMPT]
    if "--output" not in args:
        args += ["--output", str(out / "x.mp4")]

    # Under test
    result = invoke(*args)

    # Postcondition: exit 2, one line naming the problem, nothing run or written
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fvrt-run: error: "), result.stderr
    assert bad.message in lines[0]
    assert list(out.iterdir()) == []
    assert eager_engines == [], "engines were loaded before the request was checked"


def test_incomplete_or_tampered_engine_dir(setup: Setup, tmp_path: Path) -> None:
    """The real loader (no eager swap): engines the pipeline needs absent from the manifest, then a stage file
    missing, then altered, are refused before any work."""
    engines = tmp_path / "engines"
    shutil.copytree(setup.engine_dir, engines)
    out = tmp_path / "x.mp4"
    # a partial build (`fvrt-build --stages text_in`): the engines it lacks are named before anything is opened
    write_manifest(engines, _manifest(setup.release.checkpoint.config, _entries(["text_in", "dit_in"])))
    result = invoke(engines, "--prompt", PROMPT, "--output", out)
    assert result.exit_code == 2, result.output
    assert "has no engine text_block, text_out, dit_prep, dit_block, dit_out, upsampler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    # every engine listed; the files of all but dit_in present and intact
    for name in ENGINES:
        (engines / f"{name}.pt2").write_bytes(name.encode())
    digests = {n: hashlib.sha256(n.encode()).hexdigest() for n in ENGINES}
    write_manifest(engines, _manifest(setup.release.checkpoint.config, _entries(sha256=digests.__getitem__)))
    (engines / "dit_in.pt2").unlink()
    for content, message in ((None, "dit_in.pt2 is missing"), (b"tampered", "does not match its sha256")):
        if content is not None:
            (engines / "dit_in.pt2").write_bytes(content)
        result = invoke(engines, "--prompt", PROMPT, "--output", out)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
    shutil.rmtree(engines / "tokenizer")
    result = invoke(engines, "--prompt", PROMPT, "--output", out)
    assert result.exit_code == 2 and "tokenizer file tokenizer.json is missing" in result.stderr


def test_installed_script(tmp_path: Path) -> None:
    """The `fvrt-run` console script exists and exits 2 with one line for a missing engine directory."""
    exe = Path(sys.executable).with_name("fvrt-run")
    assert exe.is_file(), "pyproject [project.scripts] fvrt-run is not installed"
    result = subprocess.run(
        [str(exe), str(tmp_path / "none"), "--prompt", "x", "--output", str(tmp_path / "o.mp4")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"fvrt-run: error: engine directory not found: {tmp_path / 'none'}"]
    assert list(tmp_path.iterdir()) == []


def _lines(*objs: dict) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def test_batch_writes_every_video_with_the_engines_loaded_once(
    setup: Setup, eager_engines: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two lines, one process: both MP4s, the second line's raw output identical to a fresh single run of it (no
    state carried over from the first), command-line options as the lines' defaults, one timings file."""
    # Precondition: relative paths in the batch file are taken from the working directory
    monkeypatch.chdir(tmp_path)
    second = {"prompt": "Rain on a tin roof at night.", "output": "b.mp4", "raw": "b.npz", "preset": "realtime"}
    (tmp_path / "jobs.jsonl").write_text(_lines({"prompt": PROMPT, "output": "a.mp4", "seed": 1}) + "\n" +
                                         _lines({**second, "image": str(setup.release.image)}))  # fmt: skip

    # Under test
    result = invoke(setup.engine_dir, "--batch", "jobs.jsonl", "--seed", "5", "--timings", "t.json")

    # Postcondition
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "b.npz", "jobs.jsonl", "t.json"]
    assert eager_engines == [(setup.engine_dir, None)], "the engines are opened once"
    for name in ("a.mp4", "b.mp4"):
        with av.open(str(tmp_path / name)) as c:
            assert sum(1 for _ in c.decode(video=0)) == TINY.frames
    req = Request(second["prompt"], TINY.height, TINY.width, TINY.frames, TINY.fps, seed=5, preset="realtime",
                  image=setup.release.image)  # fmt: skip
    ref = Pipeline(EagerEngineSet(setup.release.checkpoint, [TINY]), PromptTokenizer(setup.release.tokenizer))(req)
    with np.load(tmp_path / "b.npz") as raw:
        assert np.array_equal(raw["frames"], ref.frames) and np.array_equal(raw["audio"], ref.audio)
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["memory"] == "offload" and [r["output"] for r in record["runs"]] == ["a.mp4", "b.mp4"]
    first, later = (r["timings_s"] for r in record["runs"])
    assert "engine_open" in first and "engine_open" not in later and later["total"] > 0
    assert [r["request"]["seed"] for r in record["runs"]] == [1, 5]
    assert record["runs"][1]["request"]["steps"] == [5, 2]
    assert result.stdout.count("wrote ") == 2


BAD_BATCH = {
    "no_prompt": (_lines({"output": "x.mp4"}), (), "line 1: 'prompt' is required"),
    "unknown_key": (_lines({"prompt": "a", "output": "x.mp4", "steps": 3}), (), "line 1: unknown key 'steps'"),
    "seed_type": (_lines({"prompt": "a", "output": "x.mp4", "seed": "5"}), (), "'seed' must be an integer, got \"5\""),
    "fps_bool": (_lines({"prompt": "a", "output": "x.mp4", "fps": True}), (), "'fps' must be a number"),
    "not_json": ("prompt: a\n", (), "line 1: not JSON"),
    "not_object": ("[1, 2]\n", (), "line 1: expected a JSON object, got list"),
    "bad_frames_line_3": (
        _lines({"prompt": "a", "output": "x.mp4"}) + "\n" + _lines({"prompt": "b", "output": "y.mp4", "frames": 20}),
        (),
        "line 3: --frames 20: must be 8k+1",
    ),
    "same_output": (
        _lines({"prompt": "a", "output": "x.mp4"}, {"prompt": "b", "output": "x.mp4"}),
        (),
        "line 2: --output x.mp4: each output needs its own path",
    ),
    "output_dir_missing": (_lines({"prompt": "a", "output": "no/x.mp4"}), (), "line 1: --output no/x.mp4: directory"),
    "empty": ("\n\n", (), "no requests in it"),
    "with_prompt": (_lines({"prompt": "a", "output": "x.mp4"}), ("--prompt", "b"), "give one of them"),
    "with_output": (_lines({"prompt": "a", "output": "x.mp4"}), ("--output", "y.mp4"), "--output goes in each line"),
    "missing_file": (None, (), "--batch jobs.jsonl: cannot read it"),
}


@pytest.mark.parametrize("case", list(BAD_BATCH), ids=list(BAD_BATCH))
def test_bad_batches_exit_2_and_write_nothing(
    setup: Setup, eager_engines: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.chdir(tmp_path)
    text, extra, message = BAD_BATCH[case]
    if text is not None:
        (tmp_path / "jobs.jsonl").write_text(text)
    before = sorted(tmp_path.iterdir())

    result = invoke(setup.engine_dir, "--batch", "jobs.jsonl", *extra)

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fvrt-run: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert sorted(tmp_path.iterdir()) == before and eager_engines == []


def test_neither_prompt_nor_batch(setup: Setup, eager_engines: list) -> None:
    result = invoke(setup.engine_dir)
    assert result.exit_code == 2 and "give --prompt (one video) or --batch FILE" in result.stderr


def test_serving_from_stdin_answers_each_line(
    setup: Setup, eager_engines: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--batch -`: one JSON answer per request line; a bad line is answered with its error and the next one is
    still served; the second video equals a fresh single run."""
    monkeypatch.chdir(tmp_path)
    lines = _lines({"prompt": PROMPT, "output": "a.mp4"}, {"prompt": "x", "output": "b.mp4", "frames": 20})
    lines += "\n" + _lines({"prompt": PROMPT, "output": "c.mp4", "raw": "c.npz", "seed": 3})

    result = CliRunner().invoke(cli.main, [str(setup.engine_dir), "--batch", "-", "--preset", "realtime"], input=lines)

    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 4]
    assert answers[1] == {"line": 2, "error": "stdin line 2: --frames 20: must be 8k+1 (9, 17, ..., 121)"}
    assert [a["output"] for a in (answers[0], answers[2])] == ["a.mp4", "c.mp4"]
    assert answers[2]["request"]["seed"] == 3 and answers[2]["timings_s"]["total"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "c.mp4", "c.npz"]
    assert eager_engines == [(setup.engine_dir, None)]
    req = Request(PROMPT, TINY.height, TINY.width, TINY.frames, TINY.fps, seed=3, preset="realtime")
    ref = Pipeline(EagerEngineSet(setup.release.checkpoint, [TINY]), PromptTokenizer(setup.release.tokenizer))(req)
    with np.load(tmp_path / "c.npz") as raw:
        assert np.array_equal(raw["frames"], ref.frames) and np.array_equal(raw["audio"], ref.audio)


def test_serving_from_stdin_refuses_single_run_options(setup: Setup, eager_engines: list, tmp_path: Path) -> None:
    result = invoke(setup.engine_dir, "--batch", "-", "--timings", tmp_path / "t.json")
    assert result.exit_code == 2 and "--batch -: --timings does not go with requests from standard input" in (
        result.stderr
    )
    assert eager_engines == [] and list(tmp_path.iterdir()) == []
