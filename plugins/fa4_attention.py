"""FlashAttention-4 (the `flash-attn-4` package, CuTe DSL kernels) as the DiT engines' attention: `--attention fa4`.

Why: on the H100, FA4's SM90 forward ran the stage-2 video self-attention (32,640 tokens, 32 heads x 128, bf16) in
24.6 ms against cuDNN's 27.5 ms through torch SDPA, with the same error against fp32 (1.12x; 1.69 vs 1.81 ms at
8,160 tokens; docs/results/2026-12-06-h100-attention-dit-gemm.md). It is exact attention, so no quality gate
applies beyond bf16 rounding.

How it reaches an AOTInductor engine: FA4's kernels are JIT-compiled by the CuTe DSL in Python and launched
through its own runtime, so neither Inductor (which compiles Triton, as `fvrt::fp8_attention` uses) nor a C++
custom op can hold them. `fvrt::fa4_attention` is a `torch.library.custom_op`; AOTInductor emits a call through
the dispatcher for it (its "proxy executor"), which lands back in this module's Python implementation. So:
- an engine built with `--attention fa4` needs this op registered before it is loaded: the runtime imports this
  module when a manifest records `attention: fa4` (`fvrt.runtime.engine.check_environment`), and refuses in one
  line when flash-attn-4 is missing or the GPU is not Hopper or Blackwell;
- the kernel is compiled on its first call (about 2 s on the H100; one compile serves every sequence length of a
  head dim), which the runtime's warm-up call before each CUDA-graph capture absorbs; the launches are captured
  like any other kernel (FA4 launches on torch's current stream);
- every other device runs the op as plain SDPA (the CPU fallback: same values, used by the CPU tests).

Layout: the op takes Q, K, V as [B, T, H, D] (FA4's layout; `attention` passes transposed views of the model's
[B, H, T, D], which FA4 reads through their strides without a copy) and returns [B, Tq, H, D], the layout the
output projection reads.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from fvrt.runtime.precision import ATTENTION_MIN_CC

OP_NAME = "fvrt::fa4_attention"
MODE = "fa4"
MIN_CC = ATTENTION_MIN_CC[MODE][0]  # FA4's forward kernels: SM90 (Hopper) and SM100 (Blackwell)
MAX_CC = (10, 99)
PACKAGE = "flash-attn-4"
INSTALL_HINT = "pip install flash-attn-4 (with nvidia-cutlass-dsl for the machine's CUDA)"
HEAD_DIMS = (64, 96, 128, 192, 256)  # FA4 forward head dims (multiples of 8 up to 256; these are the common ones)


def available() -> str | None:
    """None when flash-attn-4's CuTe interface can be imported, else why not (one line)."""
    try:
        if importlib.util.find_spec("flash_attn") is None:
            return f"{PACKAGE} is not installed ({INSTALL_HINT})"
        importlib.import_module("flash_attn.cute")
    except Exception as e:  # a broken install (missing CuTe DSL, wrong CUDA): say what failed
        return f"{PACKAGE} does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def version() -> str | None:
    """flash-attn-4's installed version (recorded in the manifest), None without it."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def supported(device: torch.device) -> str | None:
    """None when `device` can run the op's FA4 kernel, else why not (one line)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "FlashAttention-4 runs on CUDA GPUs only"
    cc = torch.cuda.get_device_capability(device)
    if not MIN_CC <= cc <= MAX_CC:
        return f"FlashAttention-4 runs on Hopper (9.0) and Blackwell (10.x) GPUs; this GPU is {cc[0]}.{cc[1]}"
    return available()


def _fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@torch.library.custom_op(OP_NAME, mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, scale 1/sqrt(D): q [B, Tq, H, D], k and v [B, Tk, H, D] -> [B, Tq, H, D] contiguous.
    CUDA: FlashAttention-4; elsewhere: SDPA (the fallback)."""
    if q.device.type == "cuda":
        return _fa4(q, k, v).contiguous()
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, Tq, D] (a transposed view of the op's [B, Tq, H, D]); what
    `fvrt.builder.models.common.sdpa` calls under `kernel_attention("fa4")`."""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"FlashAttention-4 attention takes head dims {HEAD_DIMS}, got {q.shape[-1]}")
    out = fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def describe() -> dict[str, Any]:
    """What an engine built with this op records in its manifest entry."""
    return {"attention_kernel": PACKAGE, "attention_kernel_version": version()}


__all__ = ["MODE", "OP_NAME", "attention", "available", "describe", "fa4_attention", "supported", "version"]
