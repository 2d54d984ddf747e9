"""Where a plugin's kernel can run: the one-line reasons the builder and the runtime refuse with."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

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


def import_problem(module: str, package: str, hint: str) -> str | None:
    """None when `module` imports, else why not in one line, naming the distribution `package`: not installed
    (its top-level package is not found; `hint` says how to install it), or the import's error (a broken build or
    install: a missing extension, another torch or CUDA)."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{package} is not installed ({hint})"
        importlib.import_module(module)
    except Exception as e:
        return f"{package} does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def source_build_version(module: str, package: str) -> str | None:
    """The version to record for a kernel package: its distribution's (`package`), else, for one built in place
    from source (no distribution metadata), the module's `__version__` or "source build"; None when `module` does
    not import."""
    import importlib
    from importlib import metadata

    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return str(getattr(mod, "__version__", "source build"))


def routed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: Callable[..., torch.Tensor],
    min_tokens: int,
    ok: bool = True,
    below: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """A size-routed kernel mode's attention on [B, H, T, D]: `kernel` where `ok` and both Q and K have at least
    `min_tokens` tokens, else `below(q, k, v)`, by default cuDNN bf16 attention (as `--attention cudnn` exports it)."""
    if not ok or min(q.shape[-2], k.shape[-2]) < min_tokens:
        if below is not None:
            return below(q, k, v)
        with cudnn_first():
            return F.scaled_dot_product_attention(q, k, v)
    return kernel(q, k, v)


def settings_entry(package: str, version: str | None, settings: dict[str, Any], min_tokens: int) -> dict[str, Any]:
    """What an engine built with a size-routed call-back op records in its manifest entry."""
    return {
        "attention_kernel": package,
        "attention_kernel_version": version,
        "attention_settings": {**settings, "min_tokens": min_tokens},
    }


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
