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
from fvrt.builder import keys as K
from fvrt.builder.backends import aoti
from fvrt.builder.build import BuildRequest
from fvrt.builder.cli import main
from fvrt.builder.request import parse_profile, resolve_stages


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
        (["--random", "tiny", "--precision", "int4"], "--precision: choose one of fp32, bf16, fp8, nvfp4"),
        (["--random", "tiny", "--stages", "vae"], "unknown engine 'vae'"),
        (["--random", "tiny", "--version", "3.0"], "--version: choose 2.0 or 2.3"),
        (["--random", "medium"], "--random: choose one of tiny, full"),
        (["--random", "tiny", "--attention", "flash9"], "--attention: choose one of"),
        (["--random", "tiny", "--cxx", "no-such-c++"], "C++ compiler 'no-such-c++' not found on PATH"),
        (["--random", "tiny", "--backend", "tensorrt-rtx", "--cxx", "g++"], "--cxx: only --backend torch-aot"),
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
    assert K.recipe(a) == K.recipe(b) != K.recipe(c)
    ids = K.checkpoint_identity(a)
    assert K.stage_keys(a, "dit_block", {"x": 1}, ids) == K.stage_keys(b, "dit_block", {"x": 1}, ids)
    code, stage = K.stage_keys(a, "dit_block", {"x": 1}, ids)
    code2, stage2 = K.stage_keys(a, "dit_block", {"x": 1}, {"main": "other"})
    assert code == code2 and stage != stage2  # another checkpoint: same code, new weights


# --------------------------------------------------------------------------------------------------------------
# TensorRT integration: --attention / --target-cc, BuildEnv, one-line build errors, reuse of every plan file


def _rtx_missing() -> str | None:
    """None when TensorRT-RTX engines can be built here (library + ONNX exporter), else why not."""
    import importlib.util

    for mod in ("onnx", "onnxscript"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'fvrt[trt]')"
    from fvrt.builder.backends import tensorrt as TB

    return TB.backend("tensorrt-rtx").available()


RTX_MISSING = _rtx_missing()
needs_rtx = pytest.mark.skipif(RTX_MISSING is not None, reason=f"TensorRT-RTX unavailable: {RTX_MISSING}")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--attention", "decomposable"],
            "--attention: choose one of default, cudnn, fp8, fp8s, fa4, sage, fa3fp8, fa3 for --backend torch-aot",
        ),
        (["--backend", "tensorrt-rtx", "--attention", "cudnn"], "choose one of default, decomposable for --backend"),
        (["--target-cc", "8.9"], "--target-cc: only --backend tensorrt-rtx takes it, not --backend torch-aot"),
        (["--backend", "tensorrt", "--target-cc", "8.9"], "full TensorRT builds for the GPU it runs on"),
        (["--backend", "tensorrt-rtx", "--target-cc", "8.9,9.0"], "cannot target compute capability 9.0"),
        (["--backend", "tensorrt-rtx", "--target-cc", "8.9", "--target-cc", "hopper"], "cannot read compute"),
        (["--conv-layout", "nhwc"], "--conv-layout: choose one of auto, ncdhw, ndhwc, got 'nhwc'"),
        (["--backend", "tensorrt-rtx", "--conv-layout", "ndhwc"], "--conv-layout: only --backend torch-aot takes it"),
        (["--jobs", "0"], "--jobs: at least 1 compile process, got 0"),
        (
            ["--backend", "tensorrt-rtx", "--jobs", "2"],
            "--jobs: only --backend torch-aot takes it, not --backend tensorrt-rtx (it builds one plan",
        ),
    ],
)
def test_tensorrt_options_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "engines"
    code, err = run_cli([str(out), "--random", "tiny", *extra], capsys)
    assert_clean_failure(tmp_path, out, code, err, message)


@needs_rtx
def test_tensorrt_options_reach_the_backend(tmp_path: Path) -> None:
    """--attention decomposable and --target-cc (repeatable, comma lists, SM names) configure the backend and
    enter the build recipe (another target list = another build)."""
    req = BuildRequest(
        out_dir=tmp_path / "e", random="tiny", backend="tensorrt-rtx", attention="decomposable",
        target_ccs=("8.9", "SM120,8.6"),
    )  # fmt: skip
    plan = B.validate(req)
    assert plan.backend.name == "tensorrt-rtx" and plan.backend.attention == "decomposable"
    assert plan.backend.target_ccs == ("8.9", "12.0", "8.6")
    default = B.validate(BuildRequest(out_dir=tmp_path / "e", random="tiny", backend="tensorrt-rtx"))
    assert default.backend.attention == "default" and default.backend.target_ccs == ("8.9", "12.0")
    r = K.recipe(plan)
    assert r["compute_capabilities"] == ["8.9", "12.0", "8.6"] and r["tensorrt"] == plan.backend.version()
    assert K.recipe(default)["compute_capabilities"] == ["8.9", "12.0"]
    ids = K.checkpoint_identity(plan)
    assert K.stage_keys(plan, "dit_prep", {}, ids)[0] != K.stage_keys(default, "dit_prep", {}, ids)[0]
    assert "tensorrt" not in K.recipe(B.validate(BuildRequest(out_dir=tmp_path / "e", random="tiny")))


def test_conv_layout_reaches_the_vae_engines_only() -> None:
    """auto: the VAE engines store NDHWC conv weights on CUDA (cuDNN's layout there), NCDHW on the CPU; the other
    engines keep NCDHW whatever is asked."""
    from fvrt.builder.backends.aoti import from_file_layout, stage_conv_layout, to_file_layout

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [stage_conv_layout("auto", s, cuda) for s in ("video_decoder", "video_encoder", "upsampler")] == [
        "ndhwc",
        "ndhwc",
        "ncdhw",
    ]
    assert stage_conv_layout("auto", "video_decoder", cpu) == "ncdhw"
    assert stage_conv_layout("ndhwc", "video_decoder", cpu) == "ndhwc"
    assert stage_conv_layout("ndhwc", "dit_block", cuda) == stage_conv_layout("ncdhw", "video_decoder", cuda) == "ncdhw"
    w = torch.randn(4, 3, 3, 3, 3)
    stored = to_file_layout(w, "ndhwc")
    assert stored.shape == (4, 3, 3, 3, 3) and stored.is_contiguous()
    assert torch.equal(stored[:, 1, 2, 0], w[..., 1, 2, 0])  # [O, kD, kH, kW, I] against [O, I, kD, kH, kW]
    back = from_file_layout(stored, "ndhwc")
    assert torch.equal(back, w) and back.is_contiguous(memory_format=torch.channels_last_3d)
    assert to_file_layout(torch.ones(4, 3), "ndhwc").shape == (4, 3) and to_file_layout(w, "ncdhw") is w


def test_reuse_copies_every_engine_file(tmp_path: Path) -> None:
    """_reuse hard-links (or copies) `file`, every file of `files` (TensorRT: one plan per shape key; FA4 kernels
    in a subfolder) and the weights file."""
    from fvrt.runtime.manifest import StageEntry

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    names = ["b.s1.plan", "b.s2.plan", "fa4_kernels/dit_block/f1/fwd/k.o", "b.weights.safetensors"]
    for i, n in enumerate(names):
        (old / n).parent.mkdir(parents=True, exist_ok=True)
        (old / n).write_bytes(bytes([i]) * 10)
    entry = StageEntry(
        name="dit_block", backend="tensorrt-rtx", file=names[0], sha256="x", precision="fp32", inputs=[],
        outputs=[], weights=names[3], weights_sha256="y", files={n: "z" for n in names[:3]},
    )  # fmt: skip
    B._reuse(old, entry, new, weights=False)
    assert sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file()) == names[:3]
    B._reuse(old, entry, new)
    assert all((new / n).read_bytes() == (old / n).read_bytes() for n in names)
    assert all((new / n).stat().st_ino == (old / n).stat().st_ino for n in names)  # linked: no second copy


@needs_rtx
def test_tensorrt_rtx_build_env_and_reuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny TensorRT-RTX build records the library version and the target list in the manifest; a rebuild
    whose build key changed but whose stage key did not reuses the stage with every per-key plan."""
    import dataclasses

    import tensorrt_rtx

    from fvrt.runtime.manifest import read_manifest, verify, write_manifest

    out = tmp_path / "engines"
    args = [str(out), "--random", "tiny", "--backend", "tensorrt-rtx", "--stages", "dit_prep"]
    main([*args, "--target-cc", "8.9", "--target-cc", "12.0"])  # returns normally: exit status 0
    m = read_manifest(out)
    assert m.build.tensorrt_version == tensorrt_rtx.__version__ and m.build.compute_capability == "8.9,12.0"
    entry = m.stages["dit_prep"]
    assert len(entry.files) == 2 and entry.extra["compute_capabilities"] == ["8.9", "12.0"]
    plans = {f: (out / f).read_bytes() for f in entry.files}

    write_manifest(out, dataclasses.replace(m, build_key="stale"))  # e.g. another fvrt recipe field
    capsys.readouterr()
    main([*args, "--target-cc", "8.9,12.0"])
    assert "dit_prep: unchanged, reused" in capsys.readouterr().out
    m2 = read_manifest(out)
    verify(out, m2)  # every plan of `files` present with its recorded sha256
    assert m2.stages["dit_prep"].files == entry.files and m2.build_key != "stale"
    assert all((out / f).read_bytes() == b for f, b in plans.items())


@needs_rtx
def test_tensorrt_build_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TensorRTBuildError (TensorRT refused a graph) is bad input, not an internal error: one line, exit 2,
    no engine directory and no temporary sibling (nor scratch ONNX) left behind."""
    from fvrt.builder.backends import tensorrt as TB

    def refuse(self: object, onnx_path: Path, **kwargs: object) -> None:
        assert onnx_path.is_file()
        raise TB.TensorRTBuildError(f"{kwargs['what']}: tensorrt_rtx build failed: no kernel\n  for this layer")

    monkeypatch.setattr(TB.TensorRTBackend, "build_plan", refuse)
    out = tmp_path / "engines"
    code, err = run_cli([str(out), "--random", "tiny", "--backend", "tensorrt-rtx", "--stages", "dit_prep"], capsys)
    assert_clean_failure(tmp_path, out, code, err, "dit_prep[tiny/s1]: tensorrt_rtx build failed: no kernel for")
