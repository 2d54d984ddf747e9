"""SageAttention 2 as the DiT engines' attention (fvrt.plugins.sage_attention, `--attention sage`).

On the CPU: the op's fallback is SDPA exactly, the builder's `sdpa` switch and the build/runtime refusals reach
it (the AOTInductor call-back path is tested for both call-back modes in tests/test_fa4_attention.py), and the
build script's stream patch is checked on launch sites shaped like SageAttention's. The kernel runs only on a
Hopper GPU with SageAttention 2 built by lab/sage_build.py (GPU-marked tests below)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_replays_on_new_inputs, gpu_attention_video_psnr, rel_error

from fvrt.builder.backends import aoti
from fvrt.builder.build import BuildError, BuildRequest, build_engines
from fvrt.builder.models import common
from fvrt.builder.models.common import kernel_attention, sdpa
from fvrt.builder.stages import stage_attention
from fvrt.plugins import CALLBACK_ATTENTION, KERNEL_ATTENTION, kernel_attention_fn, sage_attention
from fvrt.runtime.engine import check_attention_kernels
from fvrt.runtime.manifest import EngineError
from fvrt.runtime.precision import min_compute_capability

LAB = Path(__file__).resolve().parents[1] / "lab"


def _qkv(seed: int, tq: int = 96, tk: int = 80, d: int = 64, device: str = "cpu", dtype: torch.dtype = torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(2, 3, t, d, generator=g, device=device).to(dtype) for t in (tq, tk, tk))


def _sage_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sage_build", LAB / "sage_build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_fallback_is_sdpa_and_the_layouts_round_trip() -> None:
    q, k, v = _qkv(0)  # cross attention: 96 queries, 80 keys
    got = sage_attention.kernel(q, k, v)
    assert got.shape == q.shape and torch.equal(got, F.scaled_dot_product_attention(q, k, v))
    raw = sage_attention.sage_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert raw.shape == (2, 96, 3, 64) and raw.is_contiguous()  # [B, Tq, H, D]
    with pytest.raises(ValueError, match="head dim of at most 128"):
        sage_attention.kernel(*_qkv(1, d=160))


class _Sdpa(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v)


def test_sage_is_a_call_back_mode_of_the_dit_engines_only_and_needs_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        KERNEL_ATTENTION == ("fp8", "fp8s", "fa4", "sage", "fa3fp8", "fa3")
        and CALLBACK_ATTENTION["sage"] is sage_attention
    )
    assert kernel_attention_fn("sage") is sage_attention.attention
    assert [stage_attention("sage", s) for s in ("dit_block", "dit_in", "text_out", "video_decoder")] == [
        "sage",
        "sage",
        "cudnn",
        "cudnn",
    ]
    assert min_compute_capability("fp8", "sage") == ((9, 0), "fp8 with SageAttention 8-bit attention")
    q, k, v = _qkv(2, d=128)
    with kernel_attention("sage"):
        inside = sdpa(q, k, v)
    assert torch.equal(inside, F.scaled_dot_product_attention(q, k, v))
    monkeypatch.setattr(sage_attention, "MIN_TOKENS", 80)  # the op from 80 tokens on (the DiT's: 16,384)
    with kernel_attention("sage"):
        ep = torch.export.export(_Sdpa(), (q, k, v))
    assert any("sage_attention" in str(n.target) for n in ep.graph.nodes), ep.graph


def test_attentions_below_min_tokens_stay_on_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the 8-bit kernel's fixed costs lose (stage 1's 8,160 tokens, cross-attention to 1,024 text tokens),
    the engines keep plain attention: only Q and K both of at least MIN_TOKENS tokens reach the op."""
    assert (
        sage_attention.MIN_TOKENS == 16_384 and sage_attention.describe()["attention_settings"]["min_tokens"] == 16_384
    )
    monkeypatch.setattr(sage_attention, "MIN_TOKENS", 81)
    for tq, tk, want in ((96, 80, False), (80, 96, False), (96, 81, True)):
        q, k, v = _qkv(4, tq=tq, tk=tk)
        with kernel_attention("sage"):
            ep = torch.export.export(_Sdpa(), (q, k, v))
            got = sdpa(q, k, v)
        ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert any("sage_attention" in o for o in ops) == want, (tq, tk, ops)
        assert any("scaled_dot_product" in o for o in ops) == (not want), (tq, tk, ops)
        assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("mode", KERNEL_ATTENTION)
def test_kernel_modes_export_and_compile_under_cudnn_first(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export keeps SDPA as one op and AOTInductor picks its backend when it decomposes it, outside the op's own
    `cudnn_first()`: the builder's whole export + compile of a kernel mode must run under that order, or the
    attentions the mode leaves to SDPA get torch's default (FlashAttention-2, which made the sage engines' stage-1
    pass 14% slower than the cuDNN engines' on the H100, 2026-12-07)."""
    events: list[str] = []

    @contextlib.contextmanager
    def spy() -> Iterator[None]:
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(aoti, "cudnn_first", spy)
    with aoti.attention_backend(mode, torch.device("cuda")):
        events.append("inside")
        assert common._KERNEL_ATTENTION, "the mode's kernel is not switched on"
    assert events == ["enter", "inside", "exit"] and not common._KERNEL_ATTENTION
    events.clear()
    with aoti.attention_backend(mode, torch.device("cpu")):  # CPU engines: no backend order, no kernel
        assert not common._KERNEL_ATTENTION
    assert events == []


@pytest.mark.gpu
def test_sage_engines_lower_their_small_attentions_to_cudnn() -> None:
    """What AOTInductor compiles for an attention below MIN_TOKENS under `--attention sage`: the decomposed graph
    holds cuDNN's attention op, as the `--attention cudnn` engines do."""
    q, k, v = _qkv(6, 1024, 1024, 128, device="cuda", dtype=torch.bfloat16)
    lowered = {}
    for mode in ("cudnn", "sage"):
        with aoti.attention_backend(mode, torch.device("cuda")):
            ep = torch.export.export(_Sdpa(), (q, k, v)).run_decompositions()
        lowered[mode] = [str(n.target) for n in ep.graph.nodes if "attention" in str(n.target)]
    assert lowered["sage"] == lowered["cudnn"] and any("cudnn" in t for t in lowered["sage"]), lowered


def _manifest(attention: str) -> SimpleNamespace:
    entry = lambda a: SimpleNamespace(extra={"attention": a})  # noqa: E731
    return SimpleNamespace(stages={"text_out": entry("cudnn"), "dit_block": entry(attention)})


def test_the_runtime_refuses_sage_engines_where_the_kernel_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineError) as e:
        check_attention_kernels(Path("eng"), _manifest("sage"), torch.device("cpu"))
    assert str(e.value) == (
        "eng: engine dit_block was built with --attention sage (SageAttention 2): "
        "SageAttention's 8-bit kernel runs on CUDA GPUs only"
    )
    monkeypatch.setattr(sage_attention, "supported", lambda _d: None)  # as on a Hopper GPU with the kernel built
    check_attention_kernels(Path("eng"), _manifest("sage"), torch.device("cpu"))
    if sage_attention.available() is None:
        pytest.skip("SageAttention 2 is installed here")
    monkeypatch.setattr(sage_attention, "supported", lambda _d: sage_attention.available())
    with pytest.raises(EngineError, match=r"sageattention is not installed \(build SageAttention 2's") as e:
        check_attention_kernels(Path("eng"), _manifest("sage"), torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_available_says_when_the_hopper_extension_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """SageAttention's own import swallows a failed _qattn_sm90 import (SM90_ENABLED False): a build without the
    Hopper extension must be refused, not run its slower fallbacks."""
    pkg, core = ModuleType("sageattention"), ModuleType("sageattention.core")
    pkg.__path__ = []  # a package, for find_spec
    pkg.__spec__ = importlib.util.spec_from_loader("sageattention", loader=None, is_package=True)
    core.SM90_ENABLED = False
    monkeypatch.setitem(sys.modules, "sageattention", pkg)
    monkeypatch.setitem(sys.modules, "sageattention.core", core)
    assert sage_attention.available() == (
        "sageattention has no Hopper kernel (its _qattn_sm90 extension did not import; build SageAttention 2's "
        "Hopper kernels with lab/sage_build.py and put its --target on PYTHONPATH)"
    )
    core.SM90_ENABLED = True
    core.sageattn_qk_int8_pv_fp8_cuda_sm90 = lambda *a, **k: None
    assert sage_attention.available() is None
    assert sage_attention.describe()["attention_settings"] == {**sage_attention.SETTINGS, "min_tokens": 16_384}


def test_build_refuses_sage_without_a_capable_gpu(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    with pytest.raises(BuildError, match=r"^--attention sage: SageAttention's 8-bit kernel runs on CUDA GPUs only$"):
        build_engines(BuildRequest(out_dir=out, random="tiny", device="cpu", attention="sage"), log=lambda _: None)
    assert not out.exists()


_LAUNCHES = """#include "../utils.cuh"
    kernel<<<grid, NUM_THREADS, sMemSize>>>(
    QuantInt8Kernel<HEAD_DIM, BLOCK_SIZE, 4, true, false, c_type><<<grid, block>>>(x);
    other<<<g, b, 0, stream>>>(y);
    bool shift = a << 2 > b >> 1;
"""


def test_the_build_puts_every_launch_on_torchs_current_stream() -> None:
    """CUDA graph capture refuses launches on the legacy default stream; the build moves SageAttention's launches
    onto torch's current stream (and leaves launches that name a stream, and shifts, alone)."""
    sb = _sage_build()
    text, changes = sb.patch_streams(_LAUNCHES)
    stream = "at::cuda::getCurrentCUDAStream()"
    assert text.startswith("#include <ATen/cuda/CUDAContext.h>\n")
    assert f"kernel<<<grid, NUM_THREADS, sMemSize, {stream}>>>(" in text
    assert f"<<<grid, block, 0, {stream}>>>(x);" in text
    assert "other<<<g, b, 0, stream>>>(y);" in text and "a << 2 > b >> 1;" in text
    assert len(changes) == 2
    assert sb.patch_streams(text) == (text, [])  # idempotent
    with pytest.raises(ValueError, match="unexpected launch configuration"):
        sb.patch_streams("k<<<a>>>();")


def test_the_build_refuses_a_folder_that_is_not_sageattentions_source(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, str(LAB / "sage_build.py"), "--src", str(tmp_path), "--target", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "not a SageAttention source folder (no csrc/qattn/qk_int_sv_f8_cuda_sm90.cu)"
    )


# ---- GPU (Hopper with SageAttention 2 built by lab/sage_build.py) -------------------------------------------------


def _need_sage() -> None:
    if why := sage_attention.supported(torch.device("cuda")):
        pytest.skip(why)


@pytest.mark.gpu
def test_sage_kernel_error_on_random_and_trained_like_inputs() -> None:
    """Against fp32 attention at both head dims of the DiT (video 128, audio 64), cross attention with partial
    tiles (the kernel pads V to 128 keys), and keys with a large per-channel offset and outlier channels (what
    trained K projections hold, and what broke the per-tensor FP8 kernel): K smoothing must absorb the offset, so
    the error stays at the random-input level of an 8-bit P V (the smoothed FP8 kernel's 0.06 here)."""
    _need_sage()
    for d, tq, tk in ((128, 1000, 1000), (64, 300, 777), (128, 513, 128)):
        for offset in (False, True):
            q, k, v = _qkv(d + tq, tq, tk, d, device="cuda")
            if offset:
                k = k + 6.0 * torch.randn(1, 1, 1, d, device="cuda") + 20.0 * (torch.arange(d, device="cuda") % 31 == 0)
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            got = sage_attention.kernel(q, k, v)
            assert got.shape == q.shape and got.dtype == torch.bfloat16 and not got.isnan().any()
            assert rel_error(got, exact) < 0.08, (d, tq, tk, offset, rel_error(got, exact))


@pytest.mark.gpu
def test_sage_op_is_captured_by_a_cuda_graph() -> None:
    """The launches the build moved onto torch's current stream are captured (on the legacy stream the capture
    fails) and replay on new inputs."""
    _need_sage()
    assert_replays_on_new_inputs(sage_attention.kernel, *_qkv(5, 700, 700, 128, device="cuda", dtype=torch.bfloat16))


@pytest.mark.gpu
def test_sage_engines_capture_and_stay_close_to_cudnn(
    tiny_cuda_cudnn_engines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny bf16 engines built with --attention sage, the op in every DiT attention (MIN_TOKENS 0: tiny attentions
    are far below the full size's threshold): every call captured in CUDA graphs, replays identical, the video
    within the 8-bit gate (PSNR > 30 dB against the cuDNN engines', as for the smoothed FP8 kernel)."""
    _need_sage()
    monkeypatch.setattr(sage_attention, "MIN_TOKENS", 0)
    psnr = gpu_attention_video_psnr(tiny_cuda_cudnn_engines, tmp_path / "sage", "sage")
    assert psnr > 30.0, psnr
