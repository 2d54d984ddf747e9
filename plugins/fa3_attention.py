"""FlashAttention-3's FP8 Hopper kernel as the DiT engines' attention: `--attention fa3fp8` (8-bit, approximate).

What it computes: K smoothed by subtracting its mean over tokens (softmax-invariant) and V by subtracting its mean
(added back to the output, exact since every softmax row sums to 1); Q, K and V in FP8 E4M3 with one scale per
(batch, head) (amax / 448); FlashAttention-3's SM90 forward (WGMMA FP8, P in E4M3, in-kernel V transpose, FP32
accumulation) with those descales, bf16 out. The quantization is plain torch code in the exported graph, so
Inductor fuses it into the Q/K/V producers (RMS norm, RoPE); only the attention is the op.

Why this kernel: issue 18's 8-bit gate asks for 1.4x cuDNN bf16. On an H100 (2026-12-07,
docs/results/2026-12-07-h100-fa3.md) this kernel ran the stage-2 video self-attention (32,640 tokens) in 18.43 ms
against cuDNN's 27.11 (1.47x; SageAttention 2's kernel: 1.26x), 1.30x with this module's quantization fused by
Inductor, and the full-size DiT's velocity stayed at cosine 0.99986-0.99988 against cuDNN bf16 at every stage-2
step. The engines themselves are not yet timed.

How it is installed: FlashAttention-3 is not on the package index. `lab/fa3_build.py` builds its head-dim-128 SM90
forward (bf16 and E4M3) from source into a folder to put on PYTHONPATH; `import flash_attn_3._C` registers
`torch.ops.flash_attn_3.fwd`, whose kernels launch on torch's current stream (CUDA graphs capture them).

How it reaches an AOTInductor engine: as fa4 and sage, `fvrt::fa3fp8_attention` is a `torch.library.custom_op`
that the engine calls back through the dispatcher; the runtime imports this module for a manifest that records
`attention: fa3fp8` and refuses in one line where the kernel cannot run (not built, not a Hopper GPU). Every other
device runs the op as SDPA on the dequantized inputs (the CPU fallback: it computes what the kernel is given, in
fp32, so CPU tests check the quantization and the wiring, and GPU tests the kernel).

Where: as sage, only attentions with at least MIN_TOKENS queries and keys (the DiT's stage-2 video
self-attention) use it. Below that, the same build's exact bf16 kernel (fvrt.plugins.fa3_exact, op
`fvrt::fa3_attention`) takes what `--attention fa3` gives it (head dim 128, at least fa3_exact.MIN_TOKENS: the
stage-1 video self-attention, 8,160 tokens at 1080p, where it was 1.21x cuDNN on the H100); cuDNN bf16 the rest.
Head dim 128 only (the kernels this build compiles).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
import torch.nn.functional as F

from fvrt.plugins.support import cuda_support, import_problem, routed, settings_entry, source_build_version
from fvrt.runtime.precision import ATTENTION_MIN_CC

MODE = "fa3fp8"
OP_NAME = f"fvrt::{MODE}_attention"
NAME = "FlashAttention-3 FP8"
MIN_CC = MAX_CC = ATTENTION_MIN_CC[MODE][0]  # the SM90 kernels (WGMMA, TMA): Hopper only
PACKAGE = "flash_attn_3"
INSTALL_HINT = "build FlashAttention-3's Hopper forward with lab/fa3_build.py and put its --target on PYTHONPATH"
HEAD_DIM = 128
E4M3_MAX = 448.0
SETTINGS: dict[str, Any] = {"scales": "per (batch, head)", "smooth_k": True, "smooth_v": True, "format": "e4m3"}
# As sage's threshold (recorded in the manifest): the stage-2 video self-attention only, until the kernel's
# crossover against cuDNN is measured.
MIN_TOKENS = 16_384


def available() -> str | None:
    """None when FlashAttention-3's extension imports and registers its forward, else why not (one line)."""
    if why := import_problem(f"{PACKAGE}._C", PACKAGE, INSTALL_HINT):
        return why
    if not hasattr(torch.ops.flash_attn_3, "fwd"):
        return f"{PACKAGE} registered no forward op ({INSTALL_HINT})"
    return None


def version() -> str | None:
    """The installed FlashAttention-3's version (recorded in the manifest), None without it."""
    return source_build_version(PACKAGE, PACKAGE)


def supported(device: torch.device) -> str | None:
    """None when `device` can run the op's FlashAttention-3 FP8 kernel, else why not (one line)."""
    return cuda_support(device, "FlashAttention-3's FP8 kernel", MIN_CC, MAX_CC, "Hopper (9.0)") or available()


@functools.cache
def forward() -> Any:
    """torch.ops.flash_attn_3.fwd, its extension imported first: an engine calls the op back in a process that may
    never have asked available()."""
    importlib.import_module(f"{PACKAGE}._C")
    return torch.ops.flash_attn_3.fwd


@torch.library.custom_op(OP_NAME, mutates_args=())
def fa3fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_descale: torch.Tensor,
    k_descale: torch.Tensor,
    v_descale: torch.Tensor,
) -> torch.Tensor:
    """Unmasked attention, scale 1/sqrt(D), on E4M3 q [B, Tq, H, D], k and v [B, Tk, H, D] with float32 descales
    [B, H] (x = x8 * descale) -> [B, Tq, H, D] bf16. CUDA: FlashAttention-3's FP8 forward; elsewhere: SDPA on the
    dequantized inputs in fp32 (the fallback)."""
    scale = q.shape[-1] ** -0.5
    if q.device.type == "cuda":
        out = forward()(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, softmax_scale=scale)[0]
        return out.contiguous()
    deq = lambda x8, s: x8.float().transpose(1, 2) * s[:, :, None, None]  # noqa: E731  [B, H, T, D]
    out = F.scaled_dot_product_attention(deq(q, q_descale), deq(k, k_descale), deq(v, v_descale), scale=scale)
    return out.transpose(1, 2).to(torch.bfloat16).contiguous()


@fa3fp8_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_descales: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.bfloat16)


def smooth(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """[B, H, T, D] -> (Q, K - mean_t K, V - mean_t V) in float32, and V's token mean [B, H, 1, D] to add back to
    the attention's output (softmax ignores K's mean; every softmax row sums to 1, so V's comes back exactly)."""
    kf, vf = k.float(), v.float()
    vm = vf.mean(dim=2, keepdim=True)
    return (q.float(), kf - kf.mean(dim=2, keepdim=True), vf - vm), vm


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[B, H, T, D] Q, K, V -> the op's inputs in its order ([B, T, H, D] E4M3 views of the smoothed Q, K and V,
    then their [B, H] float32 descales, amax / 448) and V's token mean [B, H, 1, D] (float32) to add back."""
    xs, vm = smooth(q, k, v)
    descales = [x.abs().amax(dim=(2, 3)).clamp_min(1e-12) / E4M3_MAX for x in xs]
    x8 = [(x / s[:, :, None, None]).to(torch.float8_e4m3fn).transpose(1, 2) for x, s in zip(xs, descales, strict=True)]
    return [*x8, *descales], vm


def check_head_dim(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError unless Q, K and V have head dim 128: the only one this build of FlashAttention-3 compiles."""
    if q.shape[-1] != HEAD_DIM or k.shape[-1] != HEAD_DIM or v.shape[-1] != HEAD_DIM:
        raise ValueError(f"{name} takes head dim {HEAD_DIM} for Q, K and V, got {q.shape[-1]}")


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Quantization and the op on [B, H, T, D] -> [B, H, Tq, D] in q's dtype, at any size."""
    check_head_dim(NAME, q, k, v)
    z, vm = quantize(q, k, v)
    out = fa3fp8_attention(*z).transpose(1, 2)
    return (out.float() + vm).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What `fvrt.builder.models.common.sdpa` calls under `kernel_attention("fa3fp8")`: the op where both Q and K
    have at least MIN_TOKENS tokens and the head dim is 128; below, `--attention fa3`'s routing (the exact bf16
    kernel from fa3_exact.MIN_TOKENS, cuDNN bf16 attention elsewhere)."""
    from fvrt.plugins import fa3_exact  # imports this module

    return routed(q, k, v, kernel, MIN_TOKENS, ok=q.shape[-1] == HEAD_DIM, below=fa3_exact.attention)


def describe() -> dict[str, Any]:
    """What an engine built with this op records in its manifest entry (`bf16_min_tokens`: where the exact kernel
    starts)."""
    from fvrt.plugins import fa3_exact

    return settings_entry(PACKAGE, version(), {**SETTINGS, "bf16_min_tokens": fa3_exact.MIN_TOKENS}, MIN_TOKENS)


__all__ = [
    "E4M3_MAX",
    "MIN_TOKENS",
    "MODE",
    "NAME",
    "OP_NAME",
    "attention",
    "available",
    "check_head_dim",
    "describe",
    "fa3fp8_attention",
    "kernel",
    "quantize",
    "supported",
    "version",
]
