"""Where a plugin's kernel can run: the one-line reasons the builder and the runtime refuse with."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def cuda_support(device: torch.device, kernel: str, lo: tuple[int, int], hi: tuple[int, int], gpus: str) -> str | None:
    """None when `device` is a CUDA GPU whose compute capability lies in [lo, hi], else why not (one line):
    "`kernel` runs on CUDA GPUs only" or "`kernel` runs on `gpus` GPUs; this GPU is X.Y"."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{kernel} runs on CUDA GPUs only"
    cc = torch.cuda.get_device_capability(device)
    if not lo <= cc <= hi:
        return f"{kernel} runs on {gpus} GPUs; this GPU is {cc[0]}.{cc[1]}"
    return None


def sdpa_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, T, H, D] Q, K, V -> [B, Tq, H, D] contiguous: the call-back attention ops' fallback off their
    GPUs (what the CPU tests run)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def cudnn_first() -> contextlib.AbstractContextManager[None]:
    """SDPA's backends in the order the engines export bf16 attention (`--attention cudnn`): cuDNN first, then
    FlashAttention-2, memory-efficient, math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: cuDNN, else fall back to what the dispatcher picks
        return sdpa_kernel(order)
