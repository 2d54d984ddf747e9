"""FlashAttention-3's bf16 Hopper forward as the DiT engines' attention: `--attention fa3` (exact).

Why this kernel: on an H100 (2026-12-07, docs/results/2026-12-07-h100-fa3.md) it was the fastest exact attention
measured at the DiT's video self-attention shapes: 24.16 ms against cuDNN's 27.11 at 32,640 tokens (1.12x) and
1.60 ms against 1.94 at 8,160 (1.21x), with cuDNN's error (0.0023 / 0.0017 against fp32 on random / trained-like
inputs). FlashAttention-4's SM90 path reached 1.12x when called directly and 1.07x through its op
(`--attention fa4`), whose CuTe DSL adds per-call Python work; FA3 is a C++ extension op.

It is the same build as `--attention fa3fp8` (fvrt.plugins.fa3_attention: `lab/fa3_build.py` compiles the
head-dim-128 SM90 forward in bf16 and E4M3) and the same call-back path: `fvrt::fa3_attention` is a
`torch.library.custom_op` the engine calls back through the dispatcher; the runtime refuses in one line where it
cannot run (not built, not a Hopper GPU); elsewhere the op is SDPA (the CPU fallback).

Where: attentions with at least MIN_TOKENS queries and keys and head dim 128 (the video self-attention of both
stages); the rest stay on cuDNN bf16 (the audio attentions have head dim 64, which this build does not compile,
and smaller attentions were not measured).
"""

from __future__ import annotations

from typing import Any

import torch

from fvrt.plugins import fa3_attention
from fvrt.plugins.support import cuda_support, routed, sdpa_bthd, settings_entry
from fvrt.runtime.precision import ATTENTION_MIN_CC

MODE = "fa3"
OP_NAME = f"fvrt::{MODE}_attention"
NAME = "FlashAttention-3"
MIN_CC = MAX_CC = ATTENTION_MIN_CC[MODE][0]  # the SM90 kernels: Hopper only
HEAD_DIM = fa3_attention.HEAD_DIM
SETTINGS: dict[str, Any] = {"format": "bf16"}
# the smaller of the two sizes measured (8,160 tokens: 1.21x cuDNN), rounded down
MIN_TOKENS = 8_000


def supported(device: torch.device) -> str | None:
    """None when `device` can run FlashAttention-3's bf16 kernel, else why not (one line)."""
    return (
        cuda_support(device, "FlashAttention-3's kernel", MIN_CC, MAX_CC, "Hopper (9.0)") or fa3_attention.available()
    )


@torch.library.custom_op(OP_NAME, mutates_args=())
def fa3_exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, scale 1/sqrt(D): bf16 q [B, Tq, H, D], k and v [B, Tk, H, D] -> [B, Tq, H, D] contiguous.
    CUDA: FlashAttention-3's forward; elsewhere: SDPA (the fallback)."""
    if q.device.type == "cuda":
        return fa3_attention.forward()(q, k, v, softmax_scale=q.shape[-1] ** -0.5)[0].contiguous()
    return sdpa_bthd(q, k, v)


@fa3_exact_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op on [B, H, T, D] -> [B, H, Tq, D] (a transposed view of its [B, Tq, H, D]), at any size."""
    fa3_attention.check_head_dim(NAME, q, k, v)
    return fa3_exact_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What `fvrt.builder.models.common.sdpa` calls under `kernel_attention("fa3")`: the op where both Q and K have
    at least MIN_TOKENS tokens and the head dim is 128, cuDNN bf16 attention elsewhere."""
    return routed(q, k, v, kernel, MIN_TOKENS, ok=q.shape[-1] == HEAD_DIM)


def describe() -> dict[str, Any]:
    """What an engine built with this op records in its manifest entry."""
    return settings_entry(fa3_attention.PACKAGE, fa3_attention.version(), SETTINGS, MIN_TOKENS)


__all__ = [
    "HEAD_DIM",
    "MIN_TOKENS",
    "MODE",
    "NAME",
    "OP_NAME",
    "attention",
    "describe",
    "fa3_exact_attention",
    "kernel",
    "supported",
]
