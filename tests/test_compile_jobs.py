"""`fvrt-build --jobs N`: AOTInductor compiles in N worker processes while the build process exports the next
engines (`fvrt.builder.backends.aoti.CompilePool`). The engines must be the ones a one-process build makes: same
keys, bit-identical outputs; a worker's failure must fail the build in one line, leaving nothing behind."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
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


class _FakeCuda:
    """An input of `nbytes` on the GPU, as the test's stand-in for `_cuda_bytes` reads it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_cuda_compiles_go_to_workers_only_while_the_gpu_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """`CompilePool.admit`: CPU compiles always go to a worker; a CUDA compile needs its inputs' bytes plus the
    headroom free after what running compiles were granted, waits for a running one when short, and with none
    running stays in the build process (after one `empty_cache`), saying why."""
    monkeypatch.setattr(aoti, "_cuda_bytes", lambda args: (torch.device("cuda", 0), sum(a.nbytes for a in args)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    emptied: list[int] = []
    gib = 1 << 30
    free = {"bytes": 20 * gib}
    pool = aoti.CompilePool(2, free_gpu_bytes=lambda device: free["bytes"])
    head = aoti.WORKER_GPU_HEADROOM
    assert pool.admit([_FakeCuda(2 * gib)]) and pool.refusal == ""

    # one compile running, granted 2 GiB + headroom: the next one fits only in what is left
    running: Future = Future()
    pool._running[running] = 2 * gib + head
    left = 20 * gib - (2 * gib + head)
    assert pool.admit([_FakeCuda(left - head)])

    # short while it runs: admit waits for it; when it ends, its grant is released and the compile goes
    timer = threading.Timer(0.2, lambda: running.set_result(([], 0.0)))
    timer.start()
    t0 = time.perf_counter()
    assert pool.admit([_FakeCuda(left)])
    assert time.perf_counter() - t0 >= 0.15 and not pool._running

    # nothing running and still short: one empty_cache, then the build process compiles, and the log says why
    free["bytes"] = head
    assert not pool.admit([_FakeCuda(gib)])
    assert emptied == [1]
    need = f"{(head + gib) / gib:.1f} GiB (1.0 GiB of inputs)"
    assert pool.refusal == f"{head / gib:.1f} GiB free on the GPU, a worker needs {need}: compiled in the build process"


def test_a_worker_needs_the_bytes_of_its_strided_copies() -> None:
    """What `_example` allocates for an input: its size and strides, not the storage it is a view of."""
    base = torch.zeros(1000, 64)
    assert aoti._strided_bytes(base[10:20]) == 10 * 64 * 4  # a slice of a larger storage
    assert aoti._strided_bytes(base[:, :8]) == (999 * 64 + 8) * 4  # a strided view spans its rows
    assert aoti._strided_bytes(base.t()) == base.numel() * 4 and aoti._strided_bytes(base[:0]) == 0
    assert aoti._strided_bytes(torch.zeros(3, dtype=torch.bfloat16).expand(5, 3)) == 3 * 2  # stride 0


def test_cpu_compiles_always_go_to_workers() -> None:
    pool = aoti.CompilePool(2, free_gpu_bytes=lambda device: pytest.fail("a CPU compile asked for GPU memory"))
    assert pool.admit([torch.zeros(4), torch.zeros(2, dtype=torch.int64)]) and pool.refusal == ""
    assert aoti._cuda_bytes([torch.zeros(4), 3]) == (None, 0)


@pytest.mark.gpu
def test_a_full_gpu_keeps_the_compile_in_the_build_process(tmp_path: Path) -> None:
    """On the GPU: with all but a little of its memory taken, the pool refuses a compile (none running), and the
    engine compiled in-process; with the memory back, a worker compiles the same program and both engines compute
    what eager does."""
    torch.manual_seed(0)
    w1, b1, w2 = (torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in ((256, 128), (256,), (64, 256)))
    x = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    model = _TwoLinears()
    args = (w1, b1, w2, x)
    ep = torch.export.export(model, args)
    want = model(*args)
    pool = aoti.CompilePool(2)
    try:
        free = torch.cuda.mem_get_info()[0]
        hog = torch.empty(free - (1 << 30), dtype=torch.uint8, device="cuda")
        assert not pool.admit(args) and "compiled in the build process" in pool.refusal
        del hog
        torch.cuda.empty_cache()
        assert pool.admit(args)
        cxx = aoti.TorchAOTBackend().compiler.path
        files, _ = pool.submit(ep, args, cxx, "default", tmp_path / "programs").result()
    finally:
        pool.close()
    from torch._inductor.package import package_aoti

    package_aoti(str(tmp_path / "w.pt2"), [Path(f) for f in files])
    got = torch._inductor.aoti_load_package(str(tmp_path / "w.pt2"))(*args)
    assert_rel_close(got[0].float() if isinstance(got, (list, tuple)) else got.float(), want.float(), 1e-2, "worker")


class _TwoLinears(torch.nn.Module):
    def forward(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.relu(torch.nn.functional.linear(x, w1, b1)), w2)


def test_saved_programs_leave_the_weights_out(tmp_path: Path) -> None:
    """The program a worker loads is the graph alone: `torch.export.save` would also write the example inputs,
    which are the engine's weights (here 8 MiB); the build process's program keeps its example inputs."""
    w1, b1, w2 = torch.randn(1024, 1024), torch.randn(1024), torch.randn(1024, 1024)
    x = torch.randn(4, 1024)
    ep = torch.export.export(_TwoLinears(), (w1, b1, w2, x))
    pool = aoti.CompilePool(2)
    try:
        files, _ = pool.submit(ep, (w1, b1, w2, x), None, "default", tmp_path / "programs").result()
    finally:
        pool.close()
    (program,) = (tmp_path / "programs").iterdir()
    assert program.stat().st_size < 1 << 20, program.stat().st_size
    assert torch.export.load(str(program)).example_inputs is None
    assert ep.example_inputs is not None and ep.example_inputs[0][0] is w1
    assert files
