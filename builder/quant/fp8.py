# Ported from ltx_core/quantization/fp8_scaled_mm.py (ltx-core 1.0.0): parameter names, file layout and the
# per-tensor scale convention; the forward is ours (torch._scaled_mm or an exact emulation, no TensorRT-LLM ops).
"""FP8 (E4M3) linear layers with static per-tensor scales, as in the official `-fp8` checkpoints.

    y = (q(x / input_scale) * input_scale) @ (weight * weight_scale).T + bias,   q = saturate-to-E4M3

Storage, exactly the official file layout (keys next to `.weight`):
    weight        float8_e4m3fn [out, in]
    weight_scale  float32 []      dequantisation scale of the weight (amax(|W|) / 448)
    input_scale   float32 []      static dequantisation scale of the input (calibrated amax(|x|) / 448)
    bias          [out] in the model dtype (bf16 in the releases)

ltx-core's `fp8-scaled-mm` policy transposes the weight to [in, out] at load for TensorRT-LLM's
`cublas_scaled_mm`; fvrt keeps the file layout, since `weight.t()` is already the column-major second operand
that `torch._scaled_mm` wants.

Two forward paths, chosen per module by `mode` and the input's device type (static under tracing, so the
module stays `torch.export`-able with no data-dependent branch):
    "scaled_mm"  real FP8 GEMM: `torch._scaled_mm` (cuBLASLt on Hopper/Ada; torch >= 2.11 also has a CPU kernel);
    "emulate"    dequantise-then-matmul in float32: the same quantised operands, float32 accumulation;
    "auto"       "scaled_mm" on a CUDA device with FP8 tensor cores (SM 8.9+) when both dims are multiples of
                 16 (cuBLASLt's FP8 layout rule), "emulate" everywhere else.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value (torch.finfo(torch.float8_e4m3fn).max); activations saturate to +-448."""
FP8_MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (SM 8.9) and Hopper (SM 9.0) and later."""
SCALED_MM_ALIGN = 16
"""torch._scaled_mm on CUDA needs K and N multiples of 16 (aten meta check `_check_scaled_mm_sizes`)."""
MIN_AMAX = 1e-12
"""Floor of a calibrated amax, so a layer that only ever saw zeros gets a finite scale (0 / scale is still 0)."""

FP8_MODES = ("auto", "emulate", "scaled_mm")


@functools.cache
def fp8_supported(device_index: int) -> bool:
    """Whether CUDA device `device_index` has FP8 tensor cores (SM 8.9+)."""
    return torch.cuda.get_device_capability(device_index) >= FP8_MIN_CAPABILITY


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor dequantisation scale amax / 448 as a float32 scalar []."""
    return (amax.detach().float().clamp_min(MIN_AMAX) / E4M3_MAX).reshape(())


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to [-448, 448], rounded to float8_e4m3fn (nearest even). Any shape; scale is []."""
    return (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 weight: (float8 [out, in], weight_scale [] = amax(|W|) / 448)."""
    scale = fp8_scale(weight.detach().abs().amax())
    return quantize_fp8(weight.detach(), scale), scale


class StorageDtypeModule(nn.Module):
    """Base of the quantised Linears: `.to(device)` moves every tensor, but dtype conversions (`.to(bf16)`,
    `.float()` on a parent) leave the tensors named in `_FIXED_DTYPE` (packed codes, scales) in their storage
    dtypes; only the others (the bias) follow."""

    _FIXED_DTYPE: tuple[str, ...] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> StorageDtypeModule:
        kept = {n: getattr(self, n).data for n in self._FIXED_DTYPE}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            p = getattr(self, name)
            if p.dtype != old.dtype:
                p.data = torch.empty_like(old, device=p.device) if old.is_meta else old.to(p.device)
        return self


# ---- explicit Q/DQ for ONNX export ------------------------------------------------------------------------------
# TensorRT reads FP8 from QuantizeLinear / DequantizeLinear pairs around a MatMul (it fuses them into an FP8
# GEMM); the emulated forward's division, clamp and casts would reach ONNX as plain Div / Clip / Cast. Inside
# `qdq_export()` FP8Linear routes the same math through two custom ops that the ONNX exporter translates to
# QuantizeLinear (saturating, float8e4m3fn zero point) and DequantizeLinear (fvrt.builder.backends.onnx_export).
# Everywhere else (eager, AOTInductor) the layer keeps its plain ops, so compiled engines never see them.
_QDQ_EXPORT = [False]


@contextlib.contextmanager
def qdq_export() -> Iterator[None]:
    """FP8Linear layers emit explicit Q/DQ custom ops (for `torch.onnx.export`) while inside."""
    _QDQ_EXPORT[0] = True
    try:
        yield
    finally:
        _QDQ_EXPORT[0] = False


@torch.library.custom_op("fvrt::fp8_quantize", mutates_args=())
def fp8_quantize_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated and rounded to float8_e4m3fn (ONNX: QuantizeLinear, saturate=1)."""
    return quantize_fp8(x, scale)


@fp8_quantize_op.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float8_e4m3fn)


@torch.library.custom_op("fvrt::fp8_dequantize", mutates_args=())
def fp8_dequantize_op(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 q * scale in float32 (ONNX: DequantizeLinear)."""
    return q.float() * scale.float()


@fp8_dequantize_op.register_fake
def _(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


class FP8Linear(StorageDtypeModule):
    """Drop-in for `nn.Linear` with FP8 weight and static FP8 input quantisation (see the module docstring).

    `.to(dtype)` / `.half()` / `.bfloat16()` on a parent module move this layer's weight and scales between
    devices but never change their dtypes (the weight stays float8, the scales float32); the bias follows.
    """

    PRECISION = "fp8"  # its name in the precision table (fvrt.runtime.precision)

    _FIXED_DTYPE = ("weight", "weight_scale", "input_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bias_dtype: torch.dtype | None = None,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if mode not in FP8_MODES:
            raise ValueError(f"FP8Linear mode must be one of {FP8_MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        # Parameters (not buffers), as in the official module: per-layer engines take `named_parameters()`.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), False)
        self.weight_scale = nn.Parameter(torch.empty((), dtype=torch.float32), False)
        self.input_scale = nn.Parameter(torch.empty((), dtype=torch.float32), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_amax: torch.Tensor, *, mode: str = "auto") -> FP8Linear:
        """Quantise `linear` (weight per tensor from its own amax; input scale from the calibrated amax)."""
        w = linear.weight.detach()
        b = linear.bias
        with torch.device(w.device):
            out = cls(linear.in_features, linear.out_features, b is not None, bias_dtype=w.dtype, mode=mode)
        wq, ws = quantize_weight_fp8(w)
        out.weight.data, out.weight_scale.data = wq, ws
        out.input_scale.data = fp8_scale(input_amax.to(w.device))
        if b is not None:
            out.bias.data = b.detach().clone()
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer effectively applies, float32 [out, in]."""
        return self.weight.float() * self.weight_scale.float()

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        """Path choice from the mode, the device type and the layer's shape: Python-level and static."""
        if self.mode != "auto":
            return self.mode == "scaled_mm"
        aligned = self.in_features % SCALED_MM_ALIGN == 0 and self.out_features % SCALED_MM_ALIGN == 0
        return x.device.type == "cuda" and aligned and fp8_supported(x.device.index or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (float32 / bf16 / fp16) -> [..., out] in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if _QDQ_EXPORT[0]:  # the emulated math as explicit Q/DQ (see qdq_export)
            xd = fp8_dequantize_op(fp8_quantize_op(x2, self.input_scale), self.input_scale)
            bias = None if self.bias is None else self.bias.float()
            out = F.linear(xd, fp8_dequantize_op(self.weight, self.weight_scale), bias).to(x.dtype)
            return out.reshape(*lead, self.out_features)
        xq = quantize_fp8(x2, self.input_scale)
        if self._use_scaled_mm(x):
            out = self._scaled_mm(xq, x.dtype)
        else:
            bias = None if self.bias is None else self.bias.float()
            xd = xq.float() * self.input_scale.float()
            out = F.linear(xd, self.dequantized_weight(), bias).to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def _scaled_mm(self, xq: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Real FP8 GEMM, float32 accumulation. xq [M, K] row-major; weight.t() [K, N] column-major.

        `torch._scaled_mm(mat_a, mat_b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
        use_fast_accum=False)` (same signature in torch 2.11 and 2.13). cuBLASLt fuses the bias only for a
        16-bit output of the bias's dtype; otherwise it is added afterwards in float32.
        """
        fuse_bias = self.bias is not None and self.bias.dtype == out_dtype and out_dtype in (torch.bfloat16, torch.half)
        out = torch._scaled_mm(
            xq,
            self.weight.t(),
            scale_a=self.input_scale.float(),
            scale_b=self.weight_scale.float(),
            bias=self.bias if fuse_bias else None,
            out_dtype=out_dtype if fuse_bias or self.bias is None else torch.float32,
        )
        if self.bias is not None and not fuse_bias:
            out = (out + self.bias.float()).to(out_dtype)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " + (
            f"mode={self.mode}"
        )


__all__ = [
    "E4M3_MAX",
    "FP8Linear",
    "StorageDtypeModule",
    "fp8_dequantize_op",
    "fp8_quantize_op",
    "fp8_scale",
    "fp8_supported",
    "qdq_export",
    "quantize_fp8",
    "quantize_weight_fp8",
]
