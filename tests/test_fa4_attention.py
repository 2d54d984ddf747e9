"""FlashAttention-4 as the DiT engines' attention (fvrt.plugins.fa4_attention, `--attention fa4`).

On the CPU: the op's fallback is SDPA exactly, the builder's `sdpa` switch reaches it, an AOTInductor engine that
holds the op calls it back through the dispatcher (and fails to load in a process that has not registered it,
which is why the runtime imports the plugin for such manifests), and every refusal is one line. FA4's kernel runs
only on a Hopper/Blackwell GPU with flash-attn-4 installed (GPU-marked tests below)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import gpu_attention_video_psnr, rel_error

from fvrt.builder.build import BuildError, BuildRequest, build_engines
from fvrt.builder.models.common import kernel_attention, sdpa
from fvrt.builder.stages import stage_attention
from fvrt.plugins import KERNEL_ATTENTION, fa4_attention, kernel_attention_fn
from fvrt.runtime.engine import check_attention_kernels
from fvrt.runtime.manifest import EngineError
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
    with pytest.raises(ValueError, match="kernel attention mode must be one of"), kernel_attention("fa3"):
        pass
    assert KERNEL_ATTENTION == ("fp8", "fp8s", "fa4") and kernel_attention_fn("fa4") is fa4_attention.attention
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
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # [B, H, T, D]
        return sdpa(h, h * 0.5, h) + 1.0


def test_an_aoti_engine_calls_the_op_back_and_needs_it_registered(tmp_path: Path) -> None:
    """The mechanism `--attention fa4` engines rely on, on the CPU (where the op is SDPA): AOTInductor compiles the
    custom op as a call through the dispatcher; the package runs in a process that imported the plugin, and a
    process that did not cannot load it (the runtime registers the op for such manifests)."""
    torch.manual_seed(0)
    model = _AttnBlock().eval()
    x = torch.randn(1, 2, 24, 64)
    with kernel_attention("fa4"):
        ep = torch.export.export(model, (x,))
    assert any("fa4_attention" in str(n.target) for n in ep.graph.nodes), ep.graph
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "attn.pt2"))
    torch.save({"x": x, "want": model(x).detach()}, tmp_path / "io.pt")

    script = textwrap.dedent(f"""
        import sys, torch
        if sys.argv[1] == "register":
            import fvrt.plugins.fa4_attention  # noqa: F401
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
    assert bare.returncode == 3 and "fvrt::fa4_attention" in bare.stdout, bare.stdout + bare.stderr


def _manifest(attention: str) -> SimpleNamespace:
    entry = lambda a: SimpleNamespace(extra={"attention": a})  # noqa: E731
    return SimpleNamespace(stages={"text_out": entry("cudnn"), "dit_block": entry(attention)})


def test_the_runtime_refuses_fa4_engines_where_fa4_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    check_attention_kernels(Path("eng"), _manifest("cudnn"), torch.device("cpu"))  # no fa4 engine: nothing asked
    with pytest.raises(EngineError) as e:
        check_attention_kernels(Path("eng"), _manifest("fa4"), torch.device("cpu"))
    want = "eng: engine dit_block was built with --attention fa4 (FlashAttention-4): "
    assert str(e.value) == want + "FlashAttention-4 runs on CUDA GPUs only"
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
    q, k, v = _qkv(5, 700, 700, 128, device="cuda", dtype=torch.bfloat16)
    want = fa4_attention.attention(q, k, v).clone()  # compiles the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa4_attention.attention(q, k, v)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fa4_attention.attention(q, k, v)) and not torch.equal(out, want)


@pytest.mark.gpu
def test_fa4_engines_capture_and_match_cudnn(tiny_cuda_cudnn_engines: Path, tmp_path: Path) -> None:
    """Tiny bf16 engines built with --attention fa4 (the DiT engines call FA4 back through the dispatcher): every
    call captured in CUDA graphs, replays identical, the video as close to the cuDNN engines' as bf16 allows."""
    _need_fa4()
    psnr = gpu_attention_video_psnr(tiny_cuda_cudnn_engines, tmp_path / "fa4", "fa4")
    assert psnr > 40.0, psnr
