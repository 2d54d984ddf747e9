"""SageAttention 2's Hopper kernel as the DiT engines' attention: `--attention sage` (8-bit, approximate).

What it computes (SageAttention 2, `sageattn_qk_int8_pv_fp8_cuda_sm90`): K smoothed by subtracting its mean over
tokens (softmax-invariant), Q and K in INT8 with a scale per thread's rows of each tile ("per_thread"), Q K^T on
INT8 tensor cores, P in FP8 E4M3 against V in FP8 with one scale per channel, P V accumulated in FP32 in two levels
("fp32+fp32": the FP8 WGMMA accumulator keeps about 22 bits, so partial sums are added to an FP32 buffer every few
tiles). That is the accurate-8-bit recipe of issue 18, point 3, in a hand-written WGMMA kernel: the Triton kernels
of fvrt.plugins.fp8_attention with the same recipe reach 1.04-1.10x cuDNN on the H100, short of the 1.4x gate.

How it is installed: SageAttention 2 is not on the package index (the `sageattention` there is version 1). Build it
with `lab/sage_build.py` (its Hopper extension and its quantization kernels only, kernel launches moved onto
torch's current stream so CUDA graphs can capture them) and put the target folder on PYTHONPATH.

How it reaches an AOTInductor engine: as `fvrt::fa4_attention` does, `fvrt::sage_attention` is a
`torch.library.custom_op` that the engine calls back through the dispatcher, so the runtime imports this module
for a manifest that records `attention: sage` and refuses in one line where the kernel cannot run (not installed,
not a Hopper GPU). Every other device runs the op as plain SDPA (the CPU fallback: exact, not an emulation of the
8-bit kernel, so CPU tests check the wiring and the GPU tests the kernel's error).

Where: only attentions with at least MIN_TOKENS queries and keys (in the DiT, the stage-2 video self-attention)
run the op; the others stay on cuDNN bf16, where the 8-bit kernel's fixed costs made it slower.

Layout: the op takes Q, K, V as [B, T, H, D] (SageAttention's "NHD"; `attention` passes transposed views of the
model's [B, H, T, D], read through their strides) and returns [B, Tq, H, D].
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from fvrt.plugins.support import (
    cuda_support,
    import_problem,
    routed,
    sdpa_bthd,
    settings_entry,
    source_build_version,
)
from fvrt.runtime.precision import ATTENTION_MIN_CC

OP_NAME = "fvrt::sage_attention"
MODE = "sage"
NAME = "SageAttention 2"
MIN_CC = MAX_CC = ATTENTION_MIN_CC[MODE][0]  # the SM90 kernel (WGMMA, TMA): Hopper only
PACKAGE = "sageattention"
INSTALL_HINT = "build SageAttention 2's Hopper kernels with lab/sage_build.py and put its --target on PYTHONPATH"
MAX_HEAD_DIM = 128  # the kernel's head dims are 64 and 128; smaller ones are zero-padded by SageAttention
# the kernel's settings: the recipe above (per_warp Q/K scales are faster and coarser; "fp32" accumulation is
# refused for SM90 by SageAttention itself)
SETTINGS: dict[str, Any] = {"qk_quant_gran": "per_thread", "pv_accum_dtype": "fp32+fp32", "smooth_k": True}
# The op runs only where Q and K both have at least this many tokens; smaller attentions stay on cuDNN bf16. On the
# H100 (2026-12-07) the op, its quantization included, was 1.23x cuDNN at 32,640 tokens (the stage-2 video
# self-attention) and 0.91x at 8,160 (stage 1): six small kernels before the attention are a fixed cost. The
# crossover lies between the two and is not measured; 16,384 keeps the op on the one attention where it was seen
# to win. Recorded in the manifest (attention_settings.min_tokens).
MIN_TOKENS = 16_384


def available() -> str | None:
    """None when SageAttention 2's SM90 kernel imports, else why not (one line)."""
    if why := import_problem(f"{PACKAGE}.core", PACKAGE, INSTALL_HINT):
        return why
    core = importlib.import_module(f"{PACKAGE}.core")
    if not getattr(core, "SM90_ENABLED", False) or not hasattr(core, "sageattn_qk_int8_pv_fp8_cuda_sm90"):
        return f"{PACKAGE} has no Hopper kernel (its _qattn_sm90 extension did not import; {INSTALL_HINT})"
    return None


def version() -> str | None:
    """The installed SageAttention's version (recorded in the manifest), None without it."""
    return source_build_version(PACKAGE, PACKAGE)  # built in place by lab/sage_build.py: no distribution metadata


def supported(device: torch.device) -> str | None:
    """None when `device` can run the op's SageAttention kernel, else why not (one line)."""
    return cuda_support(device, "SageAttention's 8-bit kernel", MIN_CC, MAX_CC, "Hopper (9.0)") or available()


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn_qk_int8_pv_fp8_cuda_sm90

    return sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout="NHD", is_causal=False, **SETTINGS)


@torch.library.custom_op(OP_NAME, mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, scale 1/sqrt(D): q [B, Tq, H, D], k and v [B, Tk, H, D] -> [B, Tq, H, D] contiguous.
    CUDA: SageAttention 2's INT8/FP8 kernel; elsewhere: SDPA (the fallback)."""
    if q.device.type == "cuda":
        return _sage(q, k, v).contiguous()
    return sdpa_bthd(q, k, v)


@sage_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op on [B, H, T, D] -> [B, H, Tq, D] (a transposed view of its [B, Tq, H, D]), at any size."""
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"SageAttention takes one head dim of at most {MAX_HEAD_DIM} for Q, K and V, got {d}")
    out = sage_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What `fvrt.builder.models.common.sdpa` calls under `kernel_attention("sage")`: the op where both Q and K
    have at least MIN_TOKENS tokens, cuDNN bf16 attention (as `--attention cudnn` exports it) elsewhere."""
    return routed(q, k, v, kernel, MIN_TOKENS)


def describe() -> dict[str, Any]:
    """What an engine built with this op records in its manifest entry."""
    return settings_entry(PACKAGE, version(), SETTINGS, MIN_TOKENS)
