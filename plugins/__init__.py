"""Kernels and custom ops shared by builder and runtime (torch.library ops with fake impls).

`KERNEL_ATTENTION`: the `--attention` modes that replace the DiT engines' SDPA with one of these kernels (every
other engine keeps cuDNN): "fp8" and "fp8s" (fp8_attention: Triton kernels compiled into the engine), "fa4"
(fa4_attention: FlashAttention-4), "sage" (sage_attention: SageAttention 2's INT8/FP8 Hopper kernel), "fa3fp8"
(fa3_attention: FlashAttention-3's FP8 Hopper kernel) and "fa3" (fa3_exact: its bf16 kernel), the last four
called back through the dispatcher (`CALLBACK_ATTENTION`: the runtime must register their ops, and can run them
only where their package and GPU are). `kernel_attention_fn(mode)` is the [B, H, T, D] attention function of a mode.

A call-back plugin is a module with MODE, NAME, supported(device) (None, or why not in one line), describe() (its
manifest entry's fields) and attention(q, k, v). One that ships compiled kernels with its engines (fa4) also has
traced_shapes() (a context yielding the set of shapes an export calls its op with), save_kernels(out_dir, stage,
shapes, device) -> file names, and use_kernels(root, stages) (the runtime loads them); the builder and the
runtime call these where they exist.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import ModuleType

import torch

from fvrt.plugins import fa3_attention, fa3_exact, fa4_attention, fp8_attention, sage_attention

CALLBACK_ATTENTION: dict[str, ModuleType] = {
    m.MODE: m for m in (fa4_attention, sage_attention, fa3_attention, fa3_exact)
}
"""mode -> plugin module (MODE, NAME, supported(device), describe(), attention) of the ops engines call back."""
KERNEL_ATTENTION = (*fp8_attention.MODES, *CALLBACK_ATTENTION)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kernel_attention_fn(mode: str) -> AttentionFn:
    """The attention function of a KERNEL_ATTENTION mode; ValueError for another."""
    if mode in CALLBACK_ATTENTION:
        return CALLBACK_ATTENTION[mode].attention
    if mode in fp8_attention.MODES:
        return partial(fp8_attention.attention, mode=mode)
    raise ValueError(f"kernel attention mode must be one of {KERNEL_ATTENTION}, got {mode!r}")


__all__ = ["CALLBACK_ATTENTION", "KERNEL_ATTENTION", "AttentionFn", "kernel_attention_fn"]
