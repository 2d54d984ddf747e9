"""`fvrt-build` bad inputs: each gives exit code 2, exactly one line on stderr (no traceback) and leaves no
engine directory (nor a temporary sibling) behind. Fast: nothing here compiles."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvrt.builder import build as B
from fvrt.builder.backends import aoti
from fvrt.builder.build import BuildRequest, parse_profile, resolve_stages
from fvrt.builder.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


def assert_clean_failure(tmp_path: Path, out: Path, code: int, err: str, message: str) -> None:
    """Precondition: the CLI ran. Postcondition: exit 2, one stderr line containing `message`, no output."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fvrt-build: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Existing files and folders standing in for a release (contents never read by these tests)."""
    (tmp_path / "ckpt.safetensors").write_bytes(b"not really a checkpoint")
    (tmp_path / "up.safetensors").write_bytes(b"x")
    (tmp_path / "gemma").mkdir()
    return {"ckpt": tmp_path / "ckpt.safetensors", "up": tmp_path / "up.safetensors", "gemma": tmp_path / "gemma"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--random", "tiny", "--profile", "1080x1920x121"], "multiples of 64, got 1080x1920"),
        (["--random", "tiny", "--profile", "1088x1920x120"], "frames must be 8k+1"),
        (["--random", "tiny", "--profile", "huge"], "not a preset"),
        (["--random", "tiny", "--backend", "onnx"], "unknown backend 'onnx'"),
        (["--random", "tiny", "--precision", "fp8"], "--precision: choose one of fp32, bf16"),
        (["--random", "tiny", "--stages", "vae"], "unknown engine 'vae'"),
        (["--random", "tiny", "--version", "3.0"], "--version: choose 2.0 or 2.3"),
        (["--random", "medium"], "--random: choose one of tiny, full"),
        (["--random", "tiny", "--attention", "flash9"], "--attention: choose one of"),
        ([], "exactly one of --checkpoint FILE or --random"),
        (["--checkpoint", "missing.safetensors"], "checkpoint file not found: missing.safetensors"),
        (["--random", "tiny", "--nope"], "No such option '--nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "engines"
    code, err = run_cli([str(out), *extra], capsys)
    assert_clean_failure(tmp_path, out, code, err, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upsampler", "{up}", "--gemma", "{tmp}/no-gemma"], "Gemma folder not found"),
        (["--upsampler", "{tmp}/no-up.safetensors", "--gemma", "{gemma}"], "upsampler file not found"),
        (["--gemma", "{gemma}"], "the upsampler engine needs --upsampler FILE"),
        (["--upsampler", "{up}"], "the text_encoder engine needs --gemma DIR"),
        (["--upsampler", "{up}", "--gemma", "{gemma}", "--random", "tiny"], "exactly one of"),
        # passes validation, fails while loading: the temporary directory must go too
        (["--stages", "dit"], "not a safetensors file"),
    ],
)
def test_bad_checkpoint_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path], args: list[str], message: str
) -> None:
    out = tmp_path / "engines"
    fmt = {"up": files["up"], "gemma": files["gemma"], "tmp": tmp_path}
    code, err = run_cli([str(out), "--checkpoint", str(files["ckpt"]), *(a.format(**fmt) for a in args)], capsys)
    assert_clean_failure(tmp_path, out, code, err, message)


def test_existing_non_engine_dir_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "important"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = run_cli([str(out), "--random", "tiny"], capsys)
    assert code == 2 and "is not an engine directory (no manifest.json); use --force" in err
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    code, err = run_cli([str(tmp_path / "file"), "--random", "tiny"], capsys)
    assert code == 2 and "exists and is not a directory" in err


def test_backend_library_absent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aoti.TorchAOTBackend, "available", lambda self: "needs a C++ compiler; none found")
    out = tmp_path / "engines"
    code, err = run_cli([str(out), "--random", "tiny"], capsys)
    assert_clean_failure(tmp_path, out, code, err, "--backend torch-aot: needs a C++ compiler")


def test_tensorrt_backend_absent_or_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fvrt.builder.backends.tensorrt", reason="tensorrt backend module not in this tree")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("full TensorRT is installed here")
    out = tmp_path / "engines"
    code, err = run_cli([str(out), "--random", "tiny", "--backend", "tensorrt"], capsys)
    assert_clean_failure(tmp_path, out, code, err, "--backend tensorrt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engines"
    code, err = run_cli([str(out), "--random", "tiny", "--device", "cuda"], capsys)
    assert_clean_failure(tmp_path, out, code, err, "--device cuda: no CUDA GPU is visible")


def test_disk_full_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "dit_block.safetensors")

    monkeypatch.setattr(B, "_build_into", full)
    out = tmp_path / "engines"
    code, err = run_cli([str(out), "--random", "tiny"], capsys)
    assert_clean_failure(tmp_path, out, code, err, "disk full while building")


def test_failed_rebuild_keeps_the_previous_engine_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "engines"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an (unreadable) engine dir: rebuilt, so a failure must keep it

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(B, "_build_into", boom)
    code, err = run_cli([str(out), "--random", "tiny"], capsys)
    assert code == 2 and "disk full" in err
    assert (out / "manifest.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The installed entry point, in a fresh process (what a user runs)."""
    code = "from fvrt.builder.cli import main; main()"
    out = tmp_path / "engines"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out), "--random", "tiny", "--profile", "100x100x9"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fvrt-build: error: --profile '100x100x9': profile 100x100x9: height and width must be positive multiples "
        "of 64, got 100x100"
    ]
    assert not out.exists()


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])  # returns normally: exit status 0
    assert "--checkpoint" in capsys.readouterr().out


def test_profiles_and_stages() -> None:
    p = parse_profile("hd=1088x1920x121@25")
    assert (p.name, p.height, p.width, p.frames, p.fps) == ("hd", 1088, 1920, 121, 25.0)
    assert parse_profile("1080p").video_tokens(2) == 32640
    assert resolve_stages(["dit", "upsampler"]) == ["dit_prep", "dit_in", "dit_block", "dit_out", "upsampler"]
    assert resolve_stages([]) == list(B.ENGINE_NAMES)


def test_build_keys_ignore_paths_but_not_recipe(tmp_path: Path) -> None:
    a = B.validate(BuildRequest(out_dir=tmp_path / "a", random="tiny"))
    b = B.validate(BuildRequest(out_dir=tmp_path / "b", random="tiny"))
    c = B.validate(BuildRequest(out_dir=tmp_path / "a", random="tiny", precision="bf16"))
    assert B.recipe(a) == B.recipe(b) != B.recipe(c)
    ids = B.checkpoint_identity(a)
    assert B.stage_keys(a, "dit_block", {"x": 1}, ids) == B.stage_keys(b, "dit_block", {"x": 1}, ids)
    code, stage = B.stage_keys(a, "dit_block", {"x": 1}, ids)
    code2, stage2 = B.stage_keys(a, "dit_block", {"x": 1}, {"main": "other"})
    assert code == code2 and stage != stage2  # another checkpoint: same code, new weights
