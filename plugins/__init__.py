"""Kernels and custom ops shared by builder and runtime (torch.library ops with fake impls).

`KERNEL_ATTENTION`: the `--attention` modes that replace the DiT engines' SDPA with one of these kernels (every
other engine keeps cuDNN): "fp8" and "fp8s" (fp8_attention: Triton kernels compiled into the engine) and "fa4"
(fa4_attention: FlashAttention-4, called back through the dispatcher). `kernel_attention_fn(mode)` is the
[B, H, T, D] attention function of a mode.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from fvrt.plugins import fa4_attention, fp8_attention

KERNEL_ATTENTION = (*fp8_attention.MODES, fa4_attention.MODE)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kernel_attention_fn(mode: str) -> AttentionFn:
    """The attention function of a KERNEL_ATTENTION mode; ValueError for another."""
    if mode == fa4_attention.MODE:
        return fa4_attention.attention
    if mode in fp8_attention.MODES:
        return partial(fp8_attention.attention, mode=mode)
    raise ValueError(f"kernel attention mode must be one of {KERNEL_ATTENTION}, got {mode!r}")


__all__ = ["KERNEL_ATTENTION", "AttentionFn", "kernel_attention_fn"]
