"""FlashAttention-4 as the DiT engines' attention (fvrt.plugins.fa4_attention, `--attention fa4`).

On the CPU: the op's fallback is SDPA exactly, the builder's `sdpa` switch reaches it, an AOTInductor engine that
holds the op calls it back through the dispatcher (and fails to load in a process that has not registered it,
which is why the runtime imports the plugin for such manifests), and every refusal is one line. FA4's kernel runs
only on a Hopper/Blackwell GPU with flash-attn-4 installed (GPU-marked tests below)."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_replays_on_new_inputs, gpu_attention_video_psnr, rel_error

from fvrt.builder.build import BuildError, BuildRequest, build_engines
from fvrt.builder.models.common import kernel_attention, sdpa
from fvrt.builder.stages import stage_attention
from fvrt.plugins import CALLBACK_ATTENTION, KERNEL_ATTENTION, fa4_attention, kernel_attention_fn
from fvrt.runtime.engine import check_attention_kernels
from fvrt.runtime.manifest import EngineError, read_manifest, sha256_file
from fvrt.runtime.precision import min_compute_capability


def _qkv(seed: int, tq: int = 96, tk: int = 80, d: int = 64, device: str = "cpu", dtype: torch.dtype = torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(2, 3, t, d, generator=g, device=device).to(dtype) for t in (tq, tk, tk))


def test_cpu_fallback_is_sdpa_and_the_layouts_round_trip() -> None:
    q, k, v = _qkv(0)  # cross attention: 96 queries, 80 keys
    got = fa4_attention.attention(q, k, v)
    assert got.shape == q.shape
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v))
    raw = fa4_attention.fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert raw.shape == (2, 96, 3, 64) and raw.is_contiguous()  # [B, Tq, H, D]: what the output projection reads
    with pytest.raises(ValueError, match="head dims"):
        fa4_attention.attention(*_qkv(1, d=40))


def test_sdpa_switch_reaches_the_op_inside_the_block_only() -> None:
    q, k, v = _qkv(2, d=128)
    calls: list[str] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(str(getattr(func, "__name__", func)))
            return func(*args, **(kwargs or {}))

    with Spy(), kernel_attention("fa4"):
        inside = sdpa(q, k, v)
    assert any("fa4_attention" in c for c in calls), calls
    assert torch.equal(inside, F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="kernel attention mode must be one of"), kernel_attention("fa5"):
        pass
    assert KERNEL_ATTENTION[:3] == ("fp8", "fp8s", "fa4") and kernel_attention_fn("fa4") is fa4_attention.attention
    with pytest.raises(ValueError, match="kernel attention mode"):
        kernel_attention_fn("cudnn")


def test_fa4_reaches_the_dit_engines_only_and_needs_hopper() -> None:
    assert [stage_attention("fa4", s) for s in ("dit_block", "dit_block_1", "dit_in", "text_out", "video_decoder")] == [
        "fa4",
        "fa4",
        "fa4",
        "cudnn",
        "cudnn",
    ]
    assert min_compute_capability("bf16", "fa4") == ((9, 0), "bf16 with FlashAttention-4 attention")
    assert min_compute_capability("fp8", "fa4") == ((9, 0), "fp8 with FlashAttention-4 attention")
    assert min_compute_capability("nvfp4", "fa4") == ((10, 0), "nvfp4")
    assert min_compute_capability("bf16", "fp8s") == ((8, 9), "bf16 with smoothed FP8 attention")


class _AttnBlock(torch.nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # [B, H, T, D]
        return sdpa(h, h * 0.5, h) + 1.0


@pytest.mark.parametrize("mode", sorted(CALLBACK_ATTENTION))
def test_an_aoti_engine_calls_the_op_back_and_needs_it_registered(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mechanism `--attention fa4`, `sage` and `fa3fp8` engines rely on, on the CPU (where the op is SDPA, for
    fa3fp8 on the dequantized inputs, after the quantization the engine compiles itself): AOTInductor
    compiles the custom op as a call through the dispatcher; the package runs in a process that imported the plugin,
    and a process that did not cannot load it (the runtime registers the op for such manifests)."""
    torch.manual_seed(0)
    plugin = CALLBACK_ATTENTION[mode]
    d = getattr(plugin, "HEAD_DIM", 64)  # fa3fp8: the one head dim its kernels are built for
    model = _AttnBlock(d).eval()
    x = torch.randn(1, 2, 24, d)
    monkeypatch.setattr(plugin, "MIN_TOKENS", 0, raising=False)  # sage: the op at this tiny size too
    with kernel_attention(mode):
        ep = torch.export.export(model, (x,))
        want = model(x).detach()  # the mode's eager result (fa3fp8: its quantization, then the op's fallback)
    assert any(f"{mode}_attention" in str(n.target) for n in ep.graph.nodes), ep.graph
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "attn.pt2"))
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")

    script = textwrap.dedent(f"""
        import sys, torch
        if sys.argv[1] == "register":
            import {plugin.__name__}  # noqa: F401
        try:
            runner = torch._inductor.aoti_load_package({package!r})
        except RuntimeError as e:
            print("LOAD FAILED", str(e).splitlines()[0]); sys.exit(3)
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = runner(io["x"])
        got = got[0] if isinstance(got, (list, tuple)) else got
        print("MAXDIFF", float((got - io["want"]).abs().max()))
    """)
    ok = subprocess.run([sys.executable, "-c", script, "register"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert float(ok.stdout.split("MAXDIFF")[1]) < 1e-5, ok.stdout
    bare = subprocess.run([sys.executable, "-c", script, "bare"], capture_output=True, text=True, timeout=300)
    assert bare.returncode == 3 and plugin.OP_NAME in bare.stdout, bare.stdout + bare.stderr


class _Sdpa(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v)


def test_traced_shapes_records_what_an_export_calls_the_op_with() -> None:
    """The build wraps an engine's export and compile in `traced_shapes` to learn which FA4 kernels it needs."""
    q, k, v = _qkv(3, tq=96, tk=80, dtype=torch.bfloat16)  # [B, H, T, D]: 2 batches, 3 heads, head dim 64
    with fa4_attention.traced_shapes() as shapes, kernel_attention("fa4"):
        torch.export.export(_Sdpa(), (q, k, v))
    assert shapes == {((2, 96, 3, 64), (2, 80, 3, 64), (2, 80, 3, 64), torch.bfloat16)}  # the op's [B, T, H, D]
    with kernel_attention("fa4"):
        torch.export.export(_Sdpa(), _qkv(4, tq=32, tk=32))
    assert len(shapes) == 1 and fa4_attention._recorders == []  # nothing recorded outside the context


def _kernel(key: tuple) -> str:
    return hashlib.sha256(pickle.dumps(key)).hexdigest() + ".o"  # FA4's JITPersistentCache file name


def test_shipped_kernels_load_from_the_folders_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The runtime's FA4 cache: a shipped kernel loads once, a missing or unloadable one is a miss (FA4 compiles it
    and stores it in memory), and nothing is written into the engine directory."""
    # Precondition: one folder holds a kernel and a file that does not load, another folder is absent
    hit, miss, broken = (("cfg", torch.bfloat16, d, d, 90) for d in (128, 64, 96))
    folder = tmp_path / "fwd"
    folder.mkdir()
    (folder / _kernel(hit)).write_bytes(b"object")
    (folder / _kernel(broken)).write_bytes(b"truncated")
    loads: list[str] = []

    def load(path: Path) -> tuple[str, str]:
        loads.append(path.name)
        if path.read_bytes() == b"truncated":
            raise RuntimeError("bad object file")
        return ("kernel", path.name)

    monkeypatch.setattr(fa4_attention, "_load_kernel", load)
    before = sorted(tmp_path.rglob("*"))
    # Under test
    cache = fa4_attention.ShippedKernels([tmp_path / "absent", folder])
    assert hit in cache and cache[hit] == cache.get(hit) == ("kernel", _kernel(hit)) and cache.loaded == 1
    assert loads == [_kernel(hit)]  # loaded once, then from memory
    assert miss not in cache and cache.get(miss) is None
    with pytest.raises(KeyError):
        cache[miss]
    with caplog.at_level(logging.WARNING):
        assert broken not in cache and cache.loaded == 1  # a file that does not load is a miss: FA4 compiles
    assert "does not load (RuntimeError: bad object file)" in caplog.text
    cache[miss], cache[broken] = "compiled", "compiled too"  # what FA4 stores after compiling
    assert cache[miss] == "compiled" and cache[broken] == "compiled too"
    # Postcondition: nothing written into the folders
    assert sorted(tmp_path.rglob("*")) == before
    cache.clear()
    assert cache.cache == {}


def _fake_fa4(monkeypatch: pytest.MonkeyPatch, fingerprint: str) -> SimpleNamespace:
    """flash_attn.cute's modules as far as `use_kernels` reads them; returns `_flash_attn_fwd`."""
    fwd = SimpleNamespace(compile_cache=SimpleNamespace(cache={"compiled": "kernel"}))  # FA4's in-memory JITCache
    names = ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface", "flash_attn.cute.cache_utils")
    modules = {n: ModuleType(n) for n in names}
    modules["flash_attn.cute.interface"]._flash_attn_fwd = fwd  # type: ignore[attr-defined]
    modules["flash_attn.cute.cache_utils"]._compute_source_fingerprint = lambda: fingerprint  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return fwd


def test_use_kernels_installs_one_read_only_cache_and_never_breaks_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fa4_attention.save_kernels(tmp_path, "dit_block", set(), torch.device("cpu")) == []
    assert not (tmp_path / fa4_attention.KERNELS_DIR).exists()  # no FA4 call, no folder
    if fa4_attention.available() is not None:
        assert fa4_attention.use_kernels(tmp_path, ["dit_block"]) is None  # no flash-attn-4: nothing to install
    fwd = _fake_fa4(monkeypatch, "f1")
    cache = fa4_attention.use_kernels(tmp_path, ["dit_block", "dit_block_1"])
    assert isinstance(cache, fa4_attention.ShippedKernels) and fwd.compile_cache is cache
    assert cache.folders == tuple(tmp_path / "fa4_kernels" / s / "f1" / "fwd" for s in ("dit_block", "dit_block_1"))
    assert cache.cache == {"compiled": "kernel"}  # kernels FA4 already holds stay
    assert fa4_attention.use_kernels(tmp_path, ["dit_block", "dit_block_1"]) is cache  # idempotent
    other = fa4_attention.use_kernels(tmp_path / "other", ["dit_block"])
    assert other is not None and other is not cache and other.cache == {"compiled": "kernel"}
    del fwd.compile_cache  # a future FA4 without this cache: kernels compile at first use, loading goes on
    assert fa4_attention.use_kernels(tmp_path, ["dit_block"]) is None


def _manifest(attention: str) -> SimpleNamespace:
    entry = lambda a: SimpleNamespace(extra={"attention": a})  # noqa: E731
    return SimpleNamespace(stages={"text_out": entry("cudnn"), "dit_block": entry(attention)})


def test_the_runtime_refuses_fa4_engines_where_fa4_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    check_attention_kernels(Path("eng"), _manifest("cudnn"), torch.device("cpu"))  # no fa4 engine: nothing asked
    with pytest.raises(EngineError) as e:
        check_attention_kernels(Path("eng"), _manifest("fa4"), torch.device("cpu"))
    want = "eng: engine dit_block was built with --attention fa4 (FlashAttention-4): "
    assert str(e.value) == want + "FlashAttention-4 runs on CUDA GPUs only"
    used: list[tuple[Path, list[str]]] = []
    monkeypatch.setattr(fa4_attention, "use_kernels", lambda root, stages: used.append((root, stages)))
    monkeypatch.setattr(fa4_attention, "supported", lambda _d: None)  # as on a Hopper GPU with flash-attn-4
    check_attention_kernels(Path("eng"), _manifest("fa4"), torch.device("cpu"))
    assert used == [(Path("eng"), ["dit_block"])]  # the kernels the fa4 engines ship
    if fa4_attention.available() is None:
        pytest.skip("flash-attn-4 is installed here")
    monkeypatch.setattr(fa4_attention, "supported", lambda _d: fa4_attention.available())  # as on a Hopper GPU
    with pytest.raises(EngineError, match=r"flash-attn-4 is not installed \(pip install flash-attn-4") as e:
        check_attention_kernels(Path("eng"), _manifest("fa4"), torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_build_refuses_fa4_without_a_capable_gpu(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    with pytest.raises(BuildError, match=r"^--attention fa4: FlashAttention-4 runs on CUDA GPUs only$"):
        build_engines(BuildRequest(out_dir=out, random="tiny", device="cpu", attention="fa4"), log=lambda _: None)
    assert not out.exists()


# ---- GPU (Hopper / Blackwell with flash-attn-4) -----------------------------------------------------------------


def _need_fa4() -> None:
    if why := fa4_attention.supported(torch.device("cuda")):
        pytest.skip(why)


@pytest.mark.gpu
def test_fa4_kernel_is_as_exact_as_cudnn_on_random_and_trained_like_inputs() -> None:
    """Against fp32 attention, at both head dims of the DiT (video 128, audio 64), cross attention with a partial
    tile, and keys with a large per-channel offset and outlier channels (what trained K projections hold)."""
    _need_fa4()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for d, tq, tk in ((128, 1000, 1000), (64, 300, 777), (128, 513, 128)):
        q, k, v = _qkv(d, tq, tk, d, device="cuda")
        k = k + 6.0 * torch.randn(1, 1, 1, d, device="cuda") + 20.0 * (torch.arange(d, device="cuda") % 31 == 0)
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        got = fa4_attention.attention(q, k, v)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v)
        assert got.shape == q.shape and got.dtype == torch.bfloat16
        assert rel_error(got, exact) < 1.5 * rel_error(ref, exact) + 1e-3, (d, rel_error(got, exact))


@pytest.mark.gpu
def test_fa4_op_is_captured_by_a_cuda_graph() -> None:
    _need_fa4()
    assert_replays_on_new_inputs(fa4_attention.attention, *_qkv(5, 700, 700, 128, device="cuda", dtype=torch.bfloat16))


# A fresh process that counts the CuTe DSL compiles (FA4 calls `cute.compile` for every kernel it JIT-compiles)
_COUNT_COMPILES = """
import json, sys
from pathlib import Path
import cutlass.cute as cute
import torch
compiles = []
compile_ = cute.compile
def counted(*args, **kwargs):
    compiles.append(1)
    return compile_(*args, **kwargs)
cute.compile = counted
from flash_attn.cute import interface
from fvrt.plugins import fa4_attention
root = Path(sys.argv[1])
"""
_RESULT = """
cache = interface._flash_attn_fwd.compile_cache
print("RESULT", json.dumps({"compiles": len(compiles), "loaded": getattr(cache, "loaded", None), **result}))
"""


def _run_counting_compiles(body: str, *args: str) -> dict:
    script = _COUNT_COMPILES + textwrap.dedent(body) + _RESULT
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


@pytest.mark.gpu
def test_saved_kernels_run_in_a_fresh_process_without_compiling(tmp_path: Path) -> None:
    """`save_kernels` exports one kernel per shape class into the engine directory (no lock files left); another
    process that `use_kernels` it loads them instead of compiling, writes nothing there, and computes attention."""
    _need_fa4()
    shapes = [((1, 700, 4, 128),) * 3, ((2, 300, 2, 64), (2, 777, 2, 64), (2, 777, 2, 64))]  # video self, audio cross
    recorded = {(*s, torch.bfloat16) for s in shapes}
    files = fa4_attention.save_kernels(tmp_path, "dit_block", recorded, torch.device("cuda"))
    assert len(files) == 2 and all(f.startswith("fa4_kernels/dit_block/") and f.endswith(".o") for f in files), files
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == files
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    got = _run_counting_compiles(
        """
        import torch.nn.functional as F
        cache = fa4_attention.use_kernels(root, ["dit_block"])
        errors = []
        for shape in json.loads(sys.argv[2]):
            q, k, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shape)
            out = fa4_attention.fa4_attention(q, k, v).float()
            want = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
            errors.append(float((out - want).abs().max()))
        result = {"errors": errors}
        """,
        str(tmp_path),
        json.dumps(shapes),
    )
    assert got["compiles"] == 0 and got["loaded"] == 2, got
    assert max(got["errors"]) < 2e-2, got  # bf16 output
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # read-only: nothing written


@pytest.mark.gpu
def test_fa4_engines_capture_and_match_cudnn(tiny_cuda_cudnn_engines: Path, tmp_path: Path) -> None:
    """Tiny bf16 engines built with --attention fa4 (the DiT engines call FA4 back through the dispatcher): every
    call captured in CUDA graphs, replays identical, the video as close to the cuDNN engines' as bf16 allows. The
    DiT block engines ship the FA4 kernels they call (manifest-listed, sha256-verified), and a fresh process runs
    the pipeline on them without compiling any."""
    _need_fa4()
    folder = tmp_path / "fa4"
    psnr = gpu_attention_video_psnr(tiny_cuda_cudnn_engines, folder, "fa4")
    assert psnr > 40.0, psnr
    blocks = {n: e for n, e in read_manifest(folder).stages.items() if n.startswith("dit_block")}
    assert blocks
    for name, entry in blocks.items():
        kernels = {f: d for f, d in entry.files.items() if f.startswith(f"{fa4_attention.KERNELS_DIR}/")}
        assert kernels and entry.extra["attention_kernels"] == len(kernels), (name, entry.files, entry.extra)
        assert all(f.startswith(f"fa4_kernels/{name}/") and f.endswith(".o") for f in kernels), kernels
        assert all(sha256_file(folder / f) == d for f, d in kernels.items())
    assert not list(folder.rglob("*.lock"))
    before = {p: p.stat().st_mtime_ns for p in (folder / fa4_attention.KERNELS_DIR).rglob("*")}
    got = _run_counting_compiles(
        """
        from fvrt.builder.engines import PRESET_PROFILES
        from fvrt.runtime.engine import EngineDir
        from fvrt.runtime.pipeline import Pipeline, Request
        from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer
        tiny = PRESET_PROFILES["tiny"]
        pipe = Pipeline(EngineDir.open(root), PromptTokenizer(root / TOKENIZER_DIR), memory="keep")
        pipe(Request("a red fox runs through snow", tiny.height, tiny.width, tiny.frames, tiny.fps, seed=3))
        result = {"failures": len(pipe.graphs.failures)}
        """,
        str(folder),
    )
    assert got["compiles"] == 0 and got["loaded"] > 0 and got["failures"] == 0, got
    assert {p: p.stat().st_mtime_ns for p in (folder / fa4_attention.KERNELS_DIR).rglob("*")} == before
