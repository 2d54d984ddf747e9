"""Pieces shared by the DiT and the text connectors: RMS norm, split RoPE tables, attention, feed-forward.

Ported from ltx_core/model/transformer/{rope,attention,feed_forward}.py (ltx-core 1.0.0) and rewritten for
export: RoPE tables are built outside the hot graph (they depend only on shapes, fps and positions) and
attention runs in the [B, H, T, D] layout with no data-dependent control flow.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin), each [B, H, T, D/2]; the layout that `apply_split_rope` consumes."""


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weightless RMS norm over the last dim (the blocks' `standardization_norm`)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def freq_grid(theta: float, n_axes: int, inner_dim: int) -> torch.Tensor:
    """RoPE frequencies `theta**linspace(0, 1, n) * pi/2`, n = inner_dim // (2 * n_axes).

    Computed in float64 with numpy and rounded once to float32, as the official `generate_freq_grid_np`
    (`frequencies_precision="float64"`) does: the result is bit-identical to it.
    """
    n = inner_dim // (2 * n_axes)
    exps = np.linspace(np.log(1.0) / np.log(theta), np.log(theta) / np.log(theta), n, dtype=np.float64)
    return torch.tensor(np.power(theta, exps) * math.pi / 2, dtype=torch.float32)


def rope_tables(
    positions: torch.Tensor,
    *,
    inner_dim: int,
    heads: int,
    theta: float,
    max_pos: list[int] | tuple[int, ...],
    use_middle: bool = True,
    out_dtype: torch.dtype = torch.float32,
) -> RopeTables:
    """Split-RoPE cos/sin tables for `positions`.

    Args:
        positions: [B, n_axes, T, 2] (start, end per axis) or [B, n_axes, T]; any float dtype. With
            `use_middle` the middle (start + end) / 2 is used, otherwise the start.
        inner_dim: heads * head_dim of the attention the tables feed.
        heads: number of heads; each head gets a contiguous slice of the (frequency x axis) list.
        theta: RoPE base. max_pos: per-axis normalisers of the fractional positions.

    Returns:
        (cos, sin), each [B, heads, T, inner_dim / heads / 2] in `out_dtype`. The frequency list is flattened
        frequency-major, axis-minor and left-padded with cos=1 / sin=0 up to inner_dim / 2.
    """
    n_axes = positions.shape[1]
    if len(max_pos) != n_axes:
        raise ValueError(f"positions have {n_axes} axes but max_pos has {len(max_pos)} entries")
    if positions.ndim == 4:
        positions = (positions[..., 0] + positions[..., 1]) / 2.0 if use_middle else positions[..., 0]
    frac = torch.stack([positions[:, i] / max_pos[i] for i in range(n_axes)], dim=-1)  # [B, T, n_axes]
    freqs = freq_grid(theta, n_axes, inner_dim).to(frac.device)
    angles = (freqs * (frac.unsqueeze(-1) * 2 - 1)).transpose(-1, -2).flatten(2)  # [B, T, n_freq * n_axes]
    cos, sin = angles.cos(), angles.sin()
    pad = inner_dim // 2 - angles.shape[-1]
    if pad:
        cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
    b, t = cos.shape[:2]
    cos = cos.reshape(b, t, heads, -1).transpose(1, 2)
    sin = sin.reshape(b, t, heads, -1).transpose(1, 2)
    return cos.to(out_dtype), sin.to(out_dtype)


def apply_split_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [B, H, T, D]: pairs are (x[i], x[i + D/2]); cos/sin are [B, H, T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


_KERNEL_ATTENTION: list[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = []
"""The attention function of the innermost `kernel_attention()` block."""


@contextlib.contextmanager
def kernel_attention(mode: str) -> Iterator[None]:
    """Within this block `sdpa` runs the attention kernel of `mode` (fvrt.plugins.KERNEL_ATTENTION): "fp8"
    (per-tensor E4M3 Q, K, V and P) or "fp8s" (smoothed, per-token Q/K and per-channel V scales) from
    fvrt.plugins.fp8_attention, "fa4" (FlashAttention-4) from fvrt.plugins.fa4_attention, "sage" (SageAttention 2,
    INT8 Q K^T and FP8 P V) from fvrt.plugins.sage_attention, "fa3fp8" (FlashAttention-3's FP8 kernel) from
    fvrt.plugins.fa3_attention, "fa3" (its bf16 kernel, exact) from fvrt.plugins.fa3_exact. The builder wraps the
    export of the DiT engines in it (--attention fp8 / fp8s / fa4 / sage / fa3fp8 / fa3)."""
    from fvrt.plugins import kernel_attention_fn

    _KERNEL_ATTENTION.append(kernel_attention_fn(mode))  # ValueError for an unknown mode
    try:
        yield
    finally:
        _KERNEL_ATTENTION.pop()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on [B, H, T, D] with scale 1/sqrt(D).

    The single place where the stages call attention, so that engines can swap in a fused kernel
    (fvrt.plugins) or the ONNX `Attention` op without touching the model code.
    """
    if _KERNEL_ATTENTION:
        return _KERNEL_ATTENTION[-1](q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head attention with biased projections, QK RMSNorm across heads, split RoPE and an optional
    per-head gate `2 * sigmoid(Linear(x))` (LTX-2.3). Parameter names match the official checkpoint."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None,
        heads: int,
        dim_head: int,
        *,
        norm_eps: float = 1e-6,
        gated: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.q_norm = nn.RMSNorm(inner, eps=norm_eps)
        self.k_norm = nn.RMSNorm(inner, eps=norm_eps)
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.to_gate_logits = nn.Linear(query_dim, heads) if gated else None
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        pe: RopeTables | None = None,
        k_pe: RopeTables | None = None,
    ) -> torch.Tensor:
        """x: [B, Tq, query_dim]; context: [B, Tk, context_dim] (x when None); pe: RoPE of q (and of k
        unless k_pe is given). Returns [B, Tq, query_dim]."""
        context = x if context is None else context
        q = self._heads(self.q_norm(self.to_q(x)))
        k = self._heads(self.k_norm(self.to_k(context)))
        v = self._heads(self.to_v(context))
        if pe is not None:
            kp = pe if k_pe is None else k_pe
            q = apply_split_rope(q, *pe)
            k = apply_split_rope(k, *kp)
        out = sdpa(q, k, v)  # [B, H, Tq, D]
        if self.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(self.to_gate_logits(x))  # [B, Tq, H]
            out = out * gates.transpose(1, 2).unsqueeze(-1)
        b, _, tq, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, tq, self.heads * self.dim_head))


class FeedForward(nn.Module):
    """`Linear(d, mult*d) -> GELU(tanh) -> Linear(mult*d, d)` with the official `net.0.proj` / `net.2` names."""

    def __init__(self, dim: int, mult: int = 4, bias: bool = True) -> None:
        super().__init__()
        inner = dim * mult
        proj_in = nn.Module()
        proj_in.proj = nn.Linear(dim, inner, bias=bias)
        self.net = nn.Sequential(proj_in, nn.Identity(), nn.Linear(inner, dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))
