"""The FP8 attention candidates of the lab (lab/fa3_build.py, lab/gpu_attention.py's `fa3_fp8s`, which is
fvrt.plugins.fa3_attention's, and `cudnn_fp8s`), as far as the CPU reaches.

The kernels run only on a Hopper GPU (lab/gpu_lease_sage.sh ... fa3). Here: FlashAttention-3's build switches say
what upstream's Python side reads (flash_attn_config), its build refuses folders that are not its sources, and the
smoothed FP8 quantizations the two variants hand to their kernels (a descale per head for FlashAttention-3, per
tensor for cuDNN) reproduce attention once dequantized (the kernels' own FP8 P rounding aside)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_error

from fvrt.plugins import fa3_attention

LAB = Path(__file__).resolve().parents[1] / "lab"


def _lab(name: str) -> ModuleType:
    if str(LAB) not in sys.path:
        sys.path.insert(0, str(LAB))
    spec = importlib.util.spec_from_file_location(name, LAB / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_build_config_keeps_only_the_head_dim_128_forward_in_bf16_and_fp8(tmp_path: Path) -> None:
    fb = _lab("fa3_build")
    src = tmp_path / "src" / "hopper"
    (src / "flash_attn_3").mkdir(parents=True)
    (src / "flash_attn_3" / "__init__.py").write_text("")
    (src / "flash_attn_3" / "_C.abi3.so").write_text("stale")
    fb.prepare(tmp_path / "src", tmp_path / "work")
    assert not (tmp_path / "work" / "flash_attn_3" / "_C.abi3.so").exists()  # a stale build is not copied
    ns: dict = {}
    exec((tmp_path / "work" / "flash_attn_config.py").read_text(), ns)
    flags = ns["CONFIG"]["build_flags"]
    kept = {k for k, off in flags.items() if not off}
    assert kept == {
        "FLASHATTENTION_DISABLE_HDIM128",
        "FLASHATTENTION_DISABLE_FP8",
        "FLASHATTENTION_ENABLE_VCOLMAJOR",
    }
    # the compiler sees the same switches as the Python side (whose two HDIMDIFF keys are spelled FLASH_ATTENTION_)
    norm = lambda key: key.replace("FLASH_ATTENTION_", "FLASHATTENTION_")  # noqa: E731
    assert {f"-D{norm(k)}" for k, off in flags.items() if off} == set(fb.FEATURE_ARGS)
    assert any("hdim128_e4m3_sm90" in s for s in fb.SOURCES) and any("hdim128_bf16_sm90" in s for s in fb.SOURCES)


def test_the_build_refuses_folders_that_are_not_its_sources(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(LAB / "fa3_build.py"), *args, "--target", str(tmp_path / "t")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    done = run("--src", str(tmp_path), "--cutlass", str(tmp_path))
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "not a flash-attention source folder (no hopper/flash_api_stable.cpp)"
    )
    hopper = tmp_path / "fa" / "hopper"
    for rel in ("flash_api_stable.cpp", "flash_prepare_scheduler.cu", "flash_attn_interface.py"):
        (hopper / rel).parent.mkdir(parents=True, exist_ok=True)
        (hopper / rel).write_text("")
    for rel in ("instantiations/flash_fwd_hdim128_bf16_sm90.cu", "instantiations/flash_fwd_hdim128_e4m3_sm90.cu"):
        (hopper / rel).parent.mkdir(parents=True, exist_ok=True)
        (hopper / rel).write_text("")
    (hopper / "flash_attn_3").mkdir()
    (hopper / "flash_attn_3" / "__init__.py").write_text("")
    done = run("--src", str(tmp_path / "fa"), "--cutlass", str(tmp_path))
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "not a CUTLASS source folder (no include/cute/tensor.hpp)"
    )
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("kernel", ["fa3", "cudnn"])
def test_smoothed_fp8_quantization_reproduces_attention_once_dequantized(kernel: str) -> None:
    """K and V smoothed by their token means (softmax ignores K's; V's is added back) and E4M3 descales:
    dequantized, the attention stays within 8-bit error of fp32, on random inputs and on trained-like ones (large
    per-channel key offsets, which FP8 without smoothing cannot hold); without V's mean added back it does not."""
    ga = _lab("gpu_attention")
    g = torch.Generator().manual_seed(0)
    for make, bound in ((ga.qkv_random, 0.06), (ga.qkv_trained_like, 0.04)):
        q, k, v = make((1, 4, 384, 128), torch.device("cpu"), g)
        if kernel == "fa3":
            z, vm = fa3_attention.quantize(q, k, v)
            q8, k8, v8, qs, ks, vs = z
            assert q8.dtype == torch.float8_e4m3fn and q8.shape == (1, 384, 4, 128) and q8.stride(-1) == 1
            assert qs.shape == (1, 4) and qs.dtype == torch.float32 and qs.is_contiguous()
            deq = lambda x8, s: x8.transpose(1, 2).float() * s[:, :, None, None]  # noqa: E731
            qd, kd, vd = deq(q8, qs), deq(k8, ks), deq(v8, vs)
        else:
            pack, vm = ga.cudnn_fp8_quantize(q, k, v)
            assert pack["q"].dtype == torch.float8_e4m3fn and pack["q"].shape == q.shape and pack["q"].is_contiguous()
            assert pack["descale_q"].shape == (1, 1, 1, 1) and float(pack["scale_s"]) == 448.0
            qd, kd, vd = (pack[n].float() * pack[f"descale_{n}"] for n in "qkv")
        assert kd.mean(dim=2).abs().max() < 0.05 * kd.abs().max()  # smoothed: no key offset left
        got = F.scaled_dot_product_attention(qd, kd, vd)
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        assert rel_error(got + vm, exact) < bound, (make.__name__, rel_error(got + vm, exact))
        assert rel_error(got, exact) > 2 * bound  # V's mean is part of the answer
