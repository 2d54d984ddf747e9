"""FP8 (E4M3) flash attention for Hopper and Ada, as a Triton kernel that AOTInductor compiles into the engine.

Algorithm (forward only, unmasked, scale 1/sqrt(D), what `fvrt.builder.models.common.sdpa` computes):
- Q, K, V are quantized to E4M3 with one dynamic scale per tensor (amax / 448), computed with plain torch ops in
  `quantize_qkv` so that Inductor fuses the scale and the cast into the kernels that produce Q, K, V (QK-norm,
  RoPE): the extra cost is one amax read per tensor, no extra write.
- V is stored transposed, [B, H, D, T]: Hopper's FP8 tensor-core MMA wants both operands K-major, and for P @ V
  the reduction runs over tokens.
- The kernel is the usual online-softmax loop: S = Q8 K8^T in fp32, running max and sum in fp32, P = exp2(S - m)
  scaled by 448 and cast to E4M3 (so probabilities down to ~1e-5 stay normal numbers), O += P8 @ V8 in fp32; at
  the end O * (scale_v / 448) / l, written in bf16 as [B, T, H, D] (the layout the output projection reads, so
  no transpose follows).

The "fp8s" mode (issue 18: accurate 8-bit attention, the recipe of SageAttention 2 and FlashAttention-3's FP8):
- K is smoothed: its mean over tokens is subtracted before quantizing (softmax-invariant: it shifts every score
  of a query row by the same amount), which removes the per-channel offsets trained models put in K.
- Q and K get one scale per token (the kernel multiplies S by the outer product of two scale vectors) or, with
  `FP8S_SCALES = "tile"`, one per tile of the kernel (BLOCK_M query rows, BLOCK_N keys: one multiply per score,
  as with per-tensor scales), in E4M3 or INT8 (`qk="int8"`: more mantissa where values are near the amax, none to
  spare for outlier channels; Hopper's INT8 MMA runs at the FP8 rate).
- V is smoothed too (its token mean is added back to the output: rows of P sum to l) and scaled per channel.
- P V accumulates each key block in a fresh fp32 accumulator that is then added to the running one ("two-level
  accumulation": the FP8 MMA's own accumulator keeps fewer than 32 bits).

`reference` is the same arithmetic in torch (quantize, fp32 matmuls, P rounded to E4M3): it runs on the CPU and is
what the tiny tests check the kernel and the engines against; `attention_fp32` is the exact reference.
The module imports without Triton (CPU-only installs); the op is defined on first CUDA use (`register`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from fvrt.runtime.precision import FP8_MIN_CC

E4M3_MAX = 448.0
P_SCALE = 448.0  # probabilities in [0, 1] -> [0, 448] before the E4M3 cast
LOG2E = 1.4426950408889634
OP_NAME = "fvrt::fp8_attention"
OP_NAME_S = "fvrt::fp8s_attention"
# Q K^T and P V both in E4M3. A variant with P V in bf16 ("fp8qk") measured no faster than cuDNN bf16 on the H100
# (26.6 vs 27.2 ms at 32,640 tokens) and was removed; see docs/results/2026-11-26-h100-fp8-attention-mp4.md.
MODES = ("fp8", "fp8s")
QK_FORMATS = ("fp8", "int8")  # "fp8s": how Q and K are stored
PV_FORMATS = ("fp8", "bf16")  # "fp8s": P and V in E4M3 (the mode), or bf16 (a lab variant)
INT8_MAX = 127.0
# Tiles per (padded) head dim: the fastest of 8 at 32,640 tokens x 32 heads x 128 on the H100
# (lab/gpu_fp8_attention.py --sweep, 2026-11-26: 22.7 ms = 768 TFLOP/s; 128x128 w8: 24.0 ms)
CONFIGS: dict[int, dict[str, int]] = {
    64: {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    128: {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
}


# Q/K scales of the "fp8s" op: "token" (measured on the H100 2026-12-06: velocity cosine 0.99984 in the full-size
# DiT, kernel 1.04x cuDNN) or "tile" (one multiply per score like the per-tensor kernel, 1.12-1.18x; not yet run
# on a GPU, so not the op's)
FP8S_SCALES = "token"


def tile_blocks(head_dim: int) -> tuple[int, int]:
    """The kernel's (BLOCK_M, BLOCK_N) tiles for this head dim (padded as the kernel pads it); (1, 1) for head
    dims it has no tile for, which only the torch emulation runs."""
    padded = next((p for p in sorted(CONFIGS) if p >= head_dim), None)
    if padded is None:
        return (1, 1)
    return (CONFIGS[padded]["BLOCK_M"], CONFIGS[padded]["BLOCK_N"])


def scale_blocks(head_dim: int) -> tuple[int, int]:
    """Tokens per Q scale and per K scale of the "fp8s" op (`FP8S_SCALES`)."""
    return tile_blocks(head_dim) if FP8S_SCALES == "tile" else (1, 1)


def _scale(t: torch.Tensor) -> torch.Tensor:
    """Per-tensor E4M3 scale amax / 448 in fp32 (never 0, so an all-zero tensor quantizes to zeros)."""
    return (t.detach().abs().amax().float() / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def _to_e4m3(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, H, T, D] inputs -> q8, k8 [B, H, T, D] and vt8 [B, H, D, T], E4M3 contiguous, and the two fp32 kernel
    scalars (scale_q * scale_k / sqrt(head_dim) * log2(e), scale_v / 448). head_dim: the unpadded D (default q's)."""
    sq, sk, sv = _scale(q), _scale(k), _scale(v)
    q8 = _to_e4m3(q, sq).contiguous()
    k8 = _to_e4m3(k, sk).contiguous()
    vt8 = _to_e4m3(v, sv).transpose(-1, -2).contiguous()
    qk = sq * sk * (LOG2E / math.sqrt(head_dim or q.shape[-1]))
    return q8, k8, vt8, torch.stack([qk, sv / P_SCALE])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The kernel's arithmetic in torch (any device): [B, H, T, D] -> [B, H, T, D] in q's dtype (only the first
    `rows` queries when given; the scales still come from the whole tensors). The kernel's online softmax rounds P
    against the running row maximum, this one against the final one: the two differ by ~2.5% (relative, H100),
    about half the distance of either from fp32 (~5%)."""
    q8, k8, vt8, scales = quantize_qkv(q, k, v)
    s = (q8[..., :rows, :].float() @ k8.float().transpose(-1, -2)) * scales[0]  # log2 domain
    p = torch.exp2(s - s.amax(dim=-1, keepdim=True))
    out = ((p * P_SCALE).to(torch.float8_e4m3fn).float() @ vt8.float().transpose(-1, -2)) * scales[1]
    return (out / p.sum(dim=-1, keepdim=True)).to(q.dtype)


class Smoothed(NamedTuple):
    """`quantize_smooth`'s outputs, what the "fp8s" kernel reads. q8 / k8 [B, H, T, D] E4M3 or INT8, vt8
    [B, H, D, Tk] E4M3; q_scale [B, H, Tq] (times log2(e) / sqrt(D)), k_scale [B, H, Tk], v_scale [B, H, D] (over
    P_SCALE), v_mean [B, H, D]: all fp32 and contiguous."""

    q8: torch.Tensor
    k8: torch.Tensor
    vt8: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    v_mean: torch.Tensor


def _per_row(t: torch.Tensor, top: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """amax-over-`dim` scale (never 0) and the scaled tensor, fp32."""
    t = t.float()
    scale = (t.abs().amax(dim=dim, keepdim=True) / top).clamp_min(torch.finfo(torch.float32).tiny)
    return scale, t / scale


def expand_scale(scale: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    """A scale per `rows` tokens [B, H, ceil(T / rows)] -> one per token [B, H, T]."""
    return scale if rows == 1 else scale.repeat_interleave(rows, dim=-1)[..., :tokens]


def _quantize_rows(t: torch.Tensor, qk: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, T, D] -> (a scale per `rows` tokens [B, H, ceil(T / rows)], E4M3 or INT8 values)."""
    top = INT8_MAX if qk == "int8" else E4M3_MAX
    t = t.float()
    b, h, n, d = t.shape
    blocks = -(-n // rows)
    padded = torch.nn.functional.pad(t, (0, 0, 0, blocks * rows - n))  # zeros: the amax is unchanged
    scale = (padded.reshape(b, h, blocks, rows * d).abs().amax(dim=-1) / top).clamp_min(torch.finfo(torch.float32).tiny)
    x = t / expand_scale(scale, rows, n)[..., None]
    if qk == "int8":
        return scale, x.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8).contiguous()
    return scale, x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()


def quantize_smooth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_dim: int | None = None,
    qk: str = "fp8",
    pv: str = "fp8",
    blocks: tuple[int, int] = (1, 1),
) -> Smoothed:
    """The "fp8s" recipe's quantization (module doc), plain torch ops (Inductor fuses them into the producers of
    Q, K, V in an engine). head_dim: the unpadded D (default q's). blocks: tokens per Q scale and per K scale,
    (1, 1) per token or the kernel's (BLOCK_M, BLOCK_N) tiles (`tile_blocks`), one scalar per tile: the kernel
    then scales S by one number per tile, as the per-tensor kernel does; the op's: `scale_blocks`. pv="bf16" (a lab
    variant: 8-bit Q K^T only) keeps the smoothed V in bf16 with unit scales, for the kernel's PV_BF16 path."""
    if qk not in QK_FORMATS or pv not in PV_FORMATS:
        raise ValueError(f"qk must be one of {QK_FORMATS} and pv one of {PV_FORMATS}, got {qk!r}, {pv!r}")
    k = k.float()
    k = k - k.mean(dim=2, keepdim=True)
    q_scale, q8 = _quantize_rows(q, qk, blocks[0])
    k_scale, k8 = _quantize_rows(k, qk, blocks[1])
    v = v.float()
    v_mean = v.mean(dim=2, keepdim=True)
    v = v - v_mean
    if pv == "bf16":
        vt8 = v.to(torch.bfloat16).transpose(-1, -2).contiguous()
        v_scale = torch.full_like(v_mean, P_SCALE)  # the kernel skips P's 448: unit scale after the / P_SCALE
    else:
        v_scale, vs = _per_row(v, E4M3_MAX, 2)
        vt8 = vs.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).transpose(-1, -2).contiguous()
    q_scale = (q_scale * (LOG2E / math.sqrt(head_dim or q.shape[-1]))).contiguous()
    return Smoothed(q8, k8, vt8, q_scale, k_scale.contiguous(), (v_scale.squeeze(2) / P_SCALE).contiguous(),
                    v_mean.squeeze(2).contiguous())  # fmt: skip


def reference_smooth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: int | None = None,
    qk: str = "fp8",
    pv: str = "fp8",
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The "fp8s" kernel's arithmetic in torch (P rounded against the final row maximum), [B, H, T, D] -> same,
    in q's dtype; only the first `rows` queries when given (scales and means still from the whole tensors).
    blocks: as `quantize_smooth` (default: the op's, `scale_blocks` of the head dim)."""
    blocks = blocks or scale_blocks(q.shape[-1])
    z = quantize_smooth(q, k, v, qk=qk, pv=pv, blocks=blocks)
    q_scale = expand_scale(z.q_scale, blocks[0], q.shape[2])
    s = (z.q8[..., :rows, :].float() @ z.k8.float().transpose(-1, -2)) * q_scale[..., :rows, None]
    s = s * expand_scale(z.k_scale, blocks[1], k.shape[2])[..., None, :]
    p = torch.exp2(s - s.amax(dim=-1, keepdim=True))
    p8 = p.to(torch.bfloat16) if pv == "bf16" else (p * P_SCALE).to(torch.float8_e4m3fn)
    out = (p8.float() @ z.vt8.float().transpose(-1, -2)) * z.v_scale[..., None, :] / p.sum(dim=-1, keepdim=True)
    out = out + z.v_mean[..., None, :]
    return out.to(q.dtype)


def attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention in fp32 (the higher-precision reference)."""
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())


def supported(device: torch.device) -> bool:
    """FP8 tensor-core MMA: Ada (8.9) and Hopper (9.0) and later, with Triton importable."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_MIN_CC:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


try:  # the CUDA kernel (Triton's CPU interpreter does not round E4M3 like the GPU: tested on the GPU only)
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `reference` still works
    triton = None

_OP: Any = None
_OP_S: Any = None

if triton is not None:

    @triton.jit
    def _inner(acc, l_i, m_i, q, kt_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, n_kv, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
        for start_n in tl.range(lo, hi, BLOCK_N):
            if MASK:
                valid = (start_n + tl.arange(0, BLOCK_N)) < n_kv
                kt = tl.load(kt_ptrs + start_n * stride_kt, mask=valid[None, :], other=0.0)
                v = tl.load(v_ptrs + start_n * stride_vt, mask=valid[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs + start_n * stride_kt)
                v = tl.load(v_ptrs + start_n * stride_vt)
            s = tl.dot(q, kt) * qk_scale
            if MASK:
                s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)  # 448 = P_SCALE
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd(Q, K, Vt, Out, Scales,
             sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t,
             H, n_q, n_kv, n_full,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        rows = offs_m[:, None] < n_q
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=rows, other=0.0)
        kt_ptrs = K + b * sk_b + h * sk_h + offs_n[None, :] * sk_t + offs_d[:, None]  # [D, BLOCK_N]
        v_ptrs = Vt + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d  # [BLOCK_N, D]
        qk_scale = tl.load(Scales)
        out_scale = tl.load(Scales + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, l_i, m_i = _inner(acc, l_i, m_i, q, kt_ptrs, v_ptrs, sk_t, sv_t, 0, n_full, n_kv, qk_scale,
                               BLOCK_N, False)  # fmt: skip
        if n_full < n_kv:
            acc, l_i, m_i = _inner(acc, l_i, m_i, q, kt_ptrs, v_ptrs, sk_t, sv_t, n_full, n_kv, n_kv, qk_scale,
                                   BLOCK_N, True)  # fmt: skip
        acc = acc * (out_scale / l_i)[:, None]
        o_ptrs = Out + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=rows)

    @triton.jit
    def _inner_s(acc, l_i, m_i, q, q_scale, kt_ptrs, v_ptrs, ks_ptrs, stride_kt, stride_vt, lo, hi, n_kv,
                 BLOCK_N: tl.constexpr, MASK: tl.constexpr, SPLIT_ACC: tl.constexpr,
                 PV_BF16: tl.constexpr, PER_BLOCK: tl.constexpr):  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in tl.range(lo, hi, BLOCK_N):
            if MASK:
                valid = (start_n + offs_n) < n_kv
                kt = tl.load(kt_ptrs + start_n * stride_kt, mask=valid[None, :], other=0.0)
                v = tl.load(v_ptrs + start_n * stride_vt, mask=valid[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs + start_n * stride_kt)
                v = tl.load(v_ptrs + start_n * stride_vt)
            s = tl.dot(q, kt).to(tl.float32)  # INT8: int32 products
            if PER_BLOCK:  # one scale for this whole tile: one multiply per score, as the per-tensor kernel
                s = s * (q_scale * tl.load(ks_ptrs + start_n // BLOCK_N))
            elif MASK:
                s = s * q_scale[:, None] * tl.load(ks_ptrs + start_n + offs_n, mask=valid, other=0.0)[None, :]
            else:
                s = s * q_scale[:, None] * tl.load(ks_ptrs + start_n + offs_n)[None, :]
            if MASK:
                s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if PV_BF16:  # noqa: SIM108 (constexpr branch)
                p8 = p.to(tl.bfloat16)
            else:
                p8 = (p * 448.0).to(tl.float8e4nv)  # 448 = P_SCALE
            if SPLIT_ACC:  # noqa: SIM108 (constexpr branch) this block's P V in its own fp32 accumulator
                acc = acc * alpha[:, None] + tl.dot(p8, v)
            else:
                acc = tl.dot(p8, v, acc * alpha[:, None])
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_s(Q, K, Vt, Out, QS, KS, VS, VM,
               sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t,
               H, n_q, n_kv, n_full, n_qs, n_ks, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, SPLIT_ACC: tl.constexpr, PV_BF16: tl.constexpr,
               PER_BLOCK: tl.constexpr):  # fmt: skip
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        in_q = offs_m < n_q
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=in_q[:, None], other=0.0)
        if PER_BLOCK:  # a scalar per program, else a vector per row
            q_scale = tl.load(QS + bh * n_qs + pid_m)
        else:
            q_scale = tl.load(QS + bh * n_qs + offs_m, mask=in_q, other=0.0)
        kt_ptrs = K + b * sk_b + h * sk_h + offs_n[None, :] * sk_t + offs_d[:, None]  # [D, BLOCK_N]
        v_ptrs = Vt + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d  # [BLOCK_N, D]
        ks_ptrs = KS + bh * n_ks
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, l_i, m_i = _inner_s(acc, l_i, m_i, q, q_scale, kt_ptrs, v_ptrs, ks_ptrs, sk_t, sv_t, 0, n_full, n_kv,
                                 BLOCK_N, False, SPLIT_ACC, PV_BF16, PER_BLOCK)  # fmt: skip
        if n_full < n_kv:
            acc, l_i, m_i = _inner_s(acc, l_i, m_i, q, q_scale, kt_ptrs, v_ptrs, ks_ptrs, sk_t, sv_t, n_full, n_kv,
                                     n_kv, BLOCK_N, True, SPLIT_ACC, PV_BF16, PER_BLOCK)  # fmt: skip
        v_scale = tl.load(VS + bh * HEAD_DIM + offs_d)
        v_mean = tl.load(VM + bh * HEAD_DIM + offs_d)
        acc = acc / l_i[:, None] * v_scale[None, :] + v_mean[None, :]
        o_ptrs = Out + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=in_q[:, None])


def launch(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
           run: Any = None) -> torch.Tensor:  # fmt: skip
    """Run the kernel into `out` [B, Tq, H, D] on `quantize_qkv`'s outputs; `run` wraps the kernel (the op passes
    `wrap_triton`)."""
    if triton is None:
        raise RuntimeError("fp8 attention needs Triton (not installed)")
    b, h, n_q, d = q8.shape
    n_kv = k8.shape[2]
    cfg = dict(CONFIGS[d])
    block_m = cfg["BLOCK_M"]

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(n_q, block_m), b * h)

    fwd = _fwd if run is None else run(_fwd)
    fwd[grid](
        q8, k8, vt8, out, scales,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        vt8.stride(0), vt8.stride(1), vt8.stride(3), vt8.stride(2), out.stride(0), out.stride(2), out.stride(1),
        h, n_q, n_kv, n_kv // cfg["BLOCK_N"] * cfg["BLOCK_N"], HEAD_DIM=d, **cfg,
    )  # fmt: skip
    return out


def launch_smooth(z: Smoothed, out: torch.Tensor, run: Any = None, split_acc: bool = True,
                  config: dict[str, int] | None = None) -> torch.Tensor:  # fmt: skip
    """Run the "fp8s" kernel into `out` [B, Tq, H, D] on `quantize_smooth`'s outputs. `split_acc`: two-level P V
    accumulation; `config`: tile override (lab sweeps)."""
    if triton is None:
        raise RuntimeError("fp8 attention needs Triton (not installed)")
    b, h, n_q, d = z.q8.shape
    n_kv = z.k8.shape[2]
    cfg = dict(config or CONFIGS[d])
    block_m = cfg["BLOCK_M"]
    n_qs, n_ks = z.q_scale.shape[-1], z.k_scale.shape[-1]
    per_block = (n_qs, n_ks) != (n_q, n_kv)  # else one scale per token
    if per_block and (n_qs, n_ks) != (triton.cdiv(n_q, block_m), triton.cdiv(n_kv, cfg["BLOCK_N"])):
        raise ValueError(
            f"fp8s scales per tile need {block_m} x {cfg['BLOCK_N']} tiles: {n_qs} Q / {n_ks} K scales for "
            f"{n_q} / {n_kv} tokens"
        )

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(n_q, block_m), b * h)

    fwd = _fwd_s if run is None else run(_fwd_s)
    q8, k8, vt8 = z.q8, z.k8, z.vt8
    fwd[grid](
        q8, k8, vt8, out, z.q_scale, z.k_scale, z.v_scale, z.v_mean,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
        vt8.stride(0), vt8.stride(1), vt8.stride(3), vt8.stride(2), out.stride(0), out.stride(2), out.stride(1),
        h, n_q, n_kv, n_kv // cfg["BLOCK_N"] * cfg["BLOCK_N"], n_qs, n_ks, HEAD_DIM=d, SPLIT_ACC=split_acc,
        PV_BF16=vt8.dtype == torch.bfloat16, PER_BLOCK=per_block, **cfg,
    )  # fmt: skip
    return out


def register() -> Any:
    """Define the `fvrt::fp8_attention` and `fvrt::fp8s_attention` ops (once) and return the first. Needs
    Triton."""
    global _OP, _OP_S
    if _OP is not None:
        return _OP
    if triton is None:
        raise RuntimeError("fp8 attention needs Triton (not installed)")
    from torch.library import triton_op, wrap_triton

    @triton_op(OP_NAME, mutates_args={})
    def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """`quantize_qkv`'s outputs -> out [B, Tq, H, D] bf16."""
        b, h, n_q, d = q8.shape
        out = torch.empty((b, n_q, h, d), device=q8.device, dtype=torch.bfloat16)
        return launch(q8, k8, vt8, scales, out, run=wrap_triton)

    @triton_op(OP_NAME_S, mutates_args={})
    def fp8s_attention(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor,
                       k_scale: torch.Tensor, v_scale: torch.Tensor, v_mean: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """`quantize_smooth`'s outputs -> out [B, Tq, H, D] bf16."""
        b, h, n_q, d = q8.shape
        out = torch.empty((b, n_q, h, d), device=q8.device, dtype=torch.bfloat16)
        z = Smoothed(q8, k8, vt8, q_scale, k_scale, v_scale, v_mean)
        return launch_smooth(z, out, run=wrap_triton)

    _OP, _OP_S = fp8_attention, fp8s_attention
    return _OP


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "fp8") -> torch.Tensor:
    """FP8 attention on [B, H, T, D] bf16 -> [B, H, T, D] (a transposed view of the kernel's [B, T, H, D]).
    mode: one of MODES. CUDA runs the Triton kernel; other devices run the mode's reference (same arithmetic)."""
    if mode not in MODES:
        raise ValueError(f"fp8 attention mode must be one of {MODES}, got {mode!r}")
    if q.device.type != "cuda":
        return reference(q, k, v) if mode == "fp8" else reference_smooth(q, k, v)
    d = q.shape[-1]
    padded = next((p for p in sorted(CONFIGS) if p >= d), None)
    if padded is None:
        raise ValueError(f"fp8 attention supports head dims up to {max(CONFIGS)}, got {d}")
    if padded != d:  # zero channels change neither Q K^T nor the amax scales; their output columns are dropped
        q, k, v = (torch.nn.functional.pad(t, (0, padded - d)) for t in (q, k, v))
    op = register()
    if mode == "fp8s":
        out = _OP_S(*quantize_smooth(q, k, v, head_dim=d, blocks=scale_blocks(padded)))
    else:
        out = op(*quantize_qkv(q, k, v, head_dim=d))
    return out.transpose(1, 2)[..., :d].to(q.dtype)
