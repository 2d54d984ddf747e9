# Ported from the NVFP4 format of NVIDIA ModelOpt 0.47 (modelopt/torch/quantization/qtensor/nvfp4_tensor.py:
# scale rules, E2M1 rounding and nibble order); the code is ours and needs no CUDA.
"""NVFP4 (Blackwell): FP4 E2M1 values in 16-element blocks, an E4M3 scale per block, an FP32 global scale.

    x  ~=  e2m1 * block_scale_e4m3 * global_scale

Weights (static): global = amax(|W|) / (6 * 448); block scale = E4M3(block_amax / (6 * global)), clamped to
[2^-9, 448] (a zero block gets 1.0); e2m1 = round-to-nearest-even(W / (block_scale * global)) on the grid
{0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating at 6.
Activations (dynamic blocks, static global): the global scale `input_scale` = calibrated amax / (6 * 448); the
block scales are computed from the data at run time (TensorRT's `TRT_FP4DynamicQuantize`).

Packed storage, as ModelOpt exports it and TensorRT's ONNX `DequantizeLinear(FLOAT4E2M1, block_size=16)` reads
it: codes (bit 3 = sign, bits 0-2 = index into the grid) two per byte along the input dim, element 2i in the low
nibble; block scales float8_e4m3fn [out, in / 16] in plain row-major order (Blackwell GEMM kernels want them
swizzled: that is the engine builder's job). Tensor names in `NVFP4Linear` follow ModelOpt's export:
`weight` (uint8 [out, in / 2]), `weight_scale` (E4M3 [out, in / 16]), `weight_scale_2` and `input_scale`
(float32 []).

Everything here is an emulation in float32 (usable on any device and under `torch.export`); no hardware NVFP4
GEMM runs on Hopper. Nothing here has been checked on a Blackwell GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fvrt.builder.quant.fp8 import _QDQ_EXPORT, E4M3_MAX, MIN_AMAX, StorageDtypeModule

E2M1_MAX = 6.0
"""Largest FP4 E2M1 magnitude."""
BLOCK = 16
"""NVFP4 block length along the reduction (input) dimension."""
E4M3_MIN_SCALE = 2.0**-9
"""Smallest positive E4M3 subnormal: block scales are clamped to [2^-9, 448] before the cast (ModelOpt
`_cast_per_block_scale_to_fp8`), so no block scale underflows to 0."""


def round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Round |values| >= 0 to the E2M1 grid, nearest with ties to even code, saturating at 6 (float32 in/out).

    The grid spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; `torch.round` rounds halves to even, which is
    exactly ModelOpt's `_cast_fp4` tie rule (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
    """
    a = a.clamp(max=E2M1_MAX)
    return torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs the last dim to be a multiple of {BLOCK}, got {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP32 per-tensor scale amax / (6 * 448) as a scalar []."""
    return (amax.detach().float().clamp_min(MIN_AMAX) / (E2M1_MAX * E4M3_MAX)).reshape(())


def block_scales(x: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales [..., K / 16] of x [..., K] under global scale `gscale` []."""
    amax = _blocks(x.float()).abs().amax(dim=-1)
    s = amax / (E2M1_MAX * gscale.float())
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def fake_quantize(x: torch.Tensor, gscale: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Quantise-dequantise x [..., K] to NVFP4 (float32 out). `scales` [..., K / 16] E4M3: given (weights) or
    computed from x (dynamic activations)."""
    if scales is None:
        scales = block_scales(x, gscale)
    step = scales.float().unsqueeze(-1) * gscale.float()  # [..., K / 16, 1]
    xb = _blocks(x.float())
    q = torch.sign(xb) * round_e2m1(xb.abs() / step)
    return (q * step).reshape(x.shape)


# ---- packed storage ------------------------------------------------------------------------------------------


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """Exact grid values (float) -> 4-bit codes uint8: bit 3 sign, bits 0-2 the grid index (0, .5, 1, 1.5, 2, 3,
    4, 6). Negative zero gets code 8 only if its sign bit is set; +0 is code 0."""
    a = values.abs()
    idx = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4))
    return (torch.signbit(values).to(torch.uint8) << 3) | idx.to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 / int) -> float32 grid values, computed from the bits (no lookup-table constant)."""
    c = codes.to(torch.int32)
    e, m = ((c >> 1) & 3).float(), (c & 1).float()
    mag = torch.where(e == 0, m * 0.5, torch.exp2(e - 1) * (1 + m * 0.5))
    return torch.where((c & 8) != 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] -> bytes [..., K / 2]: element 2i in the low nibble, 2i + 1 in the high nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K / 2] -> codes [..., K] (inverse of `pack_fp4`)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def quantize_weight_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] -> (packed uint8 [out, in / 2], block scales E4M3 [out, in / 16], global scale float32 [])."""
    w = weight.detach().float()
    g = global_scale(w.abs().amax())
    s = block_scales(w, g)
    step = s.float().unsqueeze(-1) * g
    wb = _blocks(w)
    q = torch.sign(wb) * round_e2m1(wb.abs() / step)
    return pack_fp4(e2m1_codes(q.reshape(w.shape))), s, g


def dequantize_weight_nvfp4(packed: torch.Tensor, scales: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_weight_nvfp4`: float32 [out, in]."""
    vals = _blocks(e2m1_values(unpack_fp4(packed)))
    return (vals * (scales.float().unsqueeze(-1) * gscale.float())).flatten(-2)


# ---- explicit Q/DQ for the ONNX export (TensorRT family) -----------------------------------------------------
# Inside `fvrt.builder.quant.fp8.qdq_export()`, NVFP4Linear calls these two ops; the ONNX translations
# (builder/backends/onnx_export.py) turn them into ModelOpt's NVFP4 form: activations
# trt::TRT_FP4DynamicQuantize -> DequantizeLinear(block scales) -> DequantizeLinear(block_size=16), weights
# FLOAT4E2M1 -> DequantizeLinear(E4M3 scales, FP32 global) -> DequantizeLinear(block_size=16).


@torch.library.custom_op("fvrt::nvfp4_act_qdq", mutates_args=())
def nvfp4_act_qdq_op(x: torch.Tensor) -> torch.Tensor:
    """Dynamic-block NVFP4 quantise-dequantise of x under a unit global scale (float32 out). TensorRT takes the
    global scale of its dynamic quantiser only as a constant, and a per-layer engine's scales are inputs, so
    the layer divides x by its global scale first and multiplies the GEMM output by it (the same values:
    block scales are amax / (6 * global) either way)."""
    return fake_quantize(x, torch.ones((), device=x.device))


@nvfp4_act_qdq_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("fvrt::nvfp4_weight_dq", mutates_args=())
def nvfp4_weight_dq_op(packed: torch.Tensor, scales: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """Packed NVFP4 weight [out, in / 2] -> float32 [out, in]."""
    return dequantize_weight_nvfp4(packed, scales, gscale)


@nvfp4_weight_dq_op.register_fake
def _(packed: torch.Tensor, scales: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.float32)


class NVFP4Linear(StorageDtypeModule):
    """NVFP4 weights (packed) and NVFP4 activations (dynamic 16-blocks, static global scale), emulated in
    float32: y = fq(x) @ dq(W).T + bias. A Blackwell engine runs the same math with FP4 tensor cores."""

    PRECISION = "nvfp4"  # its name in the precision table (fvrt.runtime.precision)

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, bias_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"NVFP4Linear needs in_features divisible by {BLOCK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), False)
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, in_features // BLOCK, dtype=torch.float8_e4m3fn), False
        )
        self.weight_scale_2 = nn.Parameter(torch.empty((), dtype=torch.float32), False)
        self.input_scale = nn.Parameter(torch.empty((), dtype=torch.float32), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_amax: torch.Tensor) -> NVFP4Linear:
        w = linear.weight.detach()
        with torch.device(w.device):
            out = cls(linear.in_features, linear.out_features, linear.bias is not None, bias_dtype=w.dtype)
        packed, scales, g = quantize_weight_nvfp4(w)
        out.weight.data, out.weight_scale.data, out.weight_scale_2.data = packed, scales, g
        out.input_scale.data = global_scale(input_amax.to(w.device))
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]."""
        return dequantize_weight_nvfp4(self.weight, self.weight_scale, self.weight_scale_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype (float32 emulation inside)."""
        bias = None if self.bias is None else self.bias.float()
        if _QDQ_EXPORT[0]:  # the same math as explicit ops for the ONNX export (unit-scale activations)
            xq = nvfp4_act_qdq_op(x.float() / self.input_scale)
            w = nvfp4_weight_dq_op(self.weight, self.weight_scale, self.weight_scale_2)
            out = F.linear(xq, w) * self.input_scale
            return (out if bias is None else out + bias).to(x.dtype)
        xq = fake_quantize(x, self.input_scale)
        return F.linear(xq, self.dequantized_weight(), bias).to(x.dtype)

    _FIXED_DTYPE = ("weight", "weight_scale", "weight_scale_2", "input_scale")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


__all__ = [
    "BLOCK",
    "E2M1_MAX",
    "NVFP4Linear",
    "block_scales",
    "dequantize_weight_nvfp4",
    "e2m1_codes",
    "e2m1_values",
    "fake_quantize",
    "global_scale",
    "nvfp4_act_qdq_op",
    "nvfp4_weight_dq_op",
    "pack_fp4",
    "quantize_weight_nvfp4",
    "round_e2m1",
    "unpack_fp4",
]
