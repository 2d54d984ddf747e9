"""`fvrt-build --jobs N`: AOTInductor compiles in N worker processes while the build process exports the next
engines (`fvrt.builder.backends.aoti.CompilePool`). The engines must be the ones a one-process build makes: same
keys, bit-identical outputs; a worker's failure must fail the build in one line, leaving nothing behind."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import TinyBuild, assert_rel_close

from fvrt.builder.backends import aoti
from fvrt.builder.build import BuildRequest, build_engines
from fvrt.builder.checkpoint import ModelVersion
from fvrt.runtime.engine import EngineDir
from fvrt.runtime.manifest import StageEntry

# cheap engines, one of them per layer (text_block); together about a minute of compiles on the 2-core machine
STAGES = ("text_in", "text_block", "upsampler", "video_decoder")


def _inputs(entry: StageEntry, key: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in entry.inputs:
        dtype = getattr(torch, spec.dtype)
        shape = spec.shapes[key]
        out.append(
            torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
        )
    return out


def test_parallel_compiles_give_the_same_engines(tmp_path: Path, tiny_build: TinyBuild) -> None:
    """A `--jobs 2` build of four engines against the session's one-process build of the same tiny release: the
    same code and stage keys (the job count is not part of any key), bit-identical outputs on the same inputs
    (per-layer engines with each layer's weights), no saved program left in the engine folder, and each entry
    says it was compiled by the pool."""
    out = tmp_path / "jobs2"
    logs: list[str] = []
    result = build_engines(
        BuildRequest(out_dir=out, random="tiny", version=ModelVersion.LTX23.value, stages=STAGES, jobs=2),
        log=logs.append,
    )
    assert sorted(result.built) == sorted(STAGES)
    assert sum("compile handed to a worker" in line for line in logs) == len(STAGES)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".programs")]
    _same_engines(EngineDir.open(tiny_build.path, stages=list(STAGES)), EngineDir.open(out), STAGES, "cpu")


def _same_engines(serial: EngineDir, jobs: EngineDir, names: tuple[str, ...], device: str) -> None:
    for name in names:
        a, b = serial.manifest.stages[name], jobs.manifest.stages[name]
        assert (a.extra["code_key"], a.extra["stage_key"]) == (b.extra["code_key"], b.extra["stage_key"]), name
        assert b.extra["compile_jobs"] > 1 and "compile_jobs" not in a.extra
        assert b.weight_names == a.weight_names and b.inputs == a.inputs and b.outputs == a.outputs
        for key in a.inputs[0].shapes:
            for layer in range(a.per_layer) if a.per_layer else [None]:
                x = [t.to(device) for t in _inputs(a, key, seed=len(name))]
                want = serial.engine(name).run(key, *x, layer=layer)
                got = jobs.engine(name).run(key, *x, layer=layer)
                for w, g in zip(want, got, strict=True):
                    if device == "cpu":  # the same C++ from the same program: the same bits
                        assert torch.equal(w, g), (name, key, layer)
                    else:  # Triton autotuning picks a kernel config by timing, in each process anew
                        assert_rel_close(g.float(), w.float(), 1e-2, f"{name} [{key}] layer {layer}")


@pytest.mark.gpu
def test_parallel_cuda_compiles_give_the_same_engines(tmp_path: Path, tiny_cuda_cudnn_engines: Path) -> None:
    """The CUDA path: workers compile with zero CUDA example inputs in their own CUDA contexts (Triton kernels
    autotuned there); the tiny bf16 cudnn engines must match the one-process build's."""
    names = (*STAGES, "audio_decoder")
    out = tmp_path / "jobs3"
    req = BuildRequest(out_dir=out, random="tiny", precision="bf16", device="cuda", attention="cudnn", stages=names)
    build_engines(replace(req, jobs=3), log=lambda _: None)
    _same_engines(EngineDir.open(tiny_cuda_cudnn_engines, stages=list(names)), EngineDir.open(out), names, "cuda")


def test_a_failed_worker_fails_the_build_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program the worker cannot load (here: overwritten after it was saved) fails the build with one line naming
    the engine and shape key; the temporary build folder and the programs go, and no worker is left running."""
    submitted: list[aoti.CompilePool] = []
    save = torch.export.save

    def broken_save(ep, f, *args, **kwargs) -> None:
        save(ep, f, *args, **kwargs)
        Path(f).write_bytes(b"not a program")

    real_submit = aoti.CompilePool.submit

    def tracked(self: aoti.CompilePool, *args, **kwargs):
        submitted.append(self)
        return real_submit(self, *args, **kwargs)

    monkeypatch.setattr(torch.export, "save", broken_save)
    monkeypatch.setattr(aoti.CompilePool, "submit", tracked)
    out = tmp_path / "engines"
    with pytest.raises(RuntimeError) as exc:
        build_engines(BuildRequest(out_dir=out, random="tiny", stages=("text_in",), jobs=2), log=lambda _: None)
    message = str(exc.value)
    assert message.startswith("engine text_in [any]: the compile worker failed: ") and "\n" not in message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".engines.")]
    assert submitted and all(pool._executor is None for pool in submitted)  # closed by the build loop


def test_compile_pool_needs_two_jobs() -> None:
    with pytest.raises(ValueError, match="at least 2 jobs"):
        aoti.CompilePool(1)
