"""One H200 at its limit (issue 18, items 2, 3 and 5), measured in one job:

- `ceil`: the card's ceilings: device-to-device copy, bf16 GEMM, FP8 GEMM (`torch._scaled_mm`, with and without
  cuBLASLt's fast accumulation) at 8192^3.
- `attn`: exact and 8-bit attention at the DiT's video self-attention shapes (32 heads x 128, 32,640 and 8,160
  tokens): cuDNN and FlashAttention-2 through torch SDPA, the FP8 kernel of the engines (`fp8`, per-tensor
  scales), the smoothed recipe (`fp8s`) and its variants (INT8 Q K^T, bf16 P V, one-level accumulation), each
  kernel-only and with its quantization; error against fp32 on fresh random inputs AND on trained-like ones
  (peaky clustered Q K^T, K/V channel means, outlier channels); a tile sweep of the smoothed kernel.
- `dit`: the full-size LTX-2.3 DiT (random weights, eager, bf16) at the stage-2 and stage-1 token counts: the
  velocity's cosine against bf16 cuDNN attention for every attention variant (all blocks, or blocks 0 and 43-47
  kept exact like the FP8 linears), then with the FP8 linears of the engines (calibrated here on the same
  inputs, `torch._scaled_mm`) with and without fast accumulation; also the (M, K, N) of every Linear call.
- `gemm`: the DiT's heaviest Linear shapes (from `dit`): bf16 vs FP8 with and without fast accumulation,
  TFLOP/s and error against fp32.
- `fa4`: FlashAttention-4 (flash-attn-4, CuTe DSL, its SM90 forward) at the same shapes, in a subprocess with
  `--fa4-site` on its PYTHONPATH (skipped when the folder holds no flash_attn).
- `attn` and `dit` also take the engines' call-back ops where they can run: `fa4` (flash-attn-4 importable) and
  `sage` (SageAttention 2 built by lab/sage_build.py on PYTHONPATH; `sage` as the engines route it, `sage_all` the
  op at every size, also timed kernel-only on inputs quantized once): name them in `--dit-attention`.
- `attn` and `dit` also take cuDNN's FP8 attention through its frontend (`nvidia-cudnn-frontend` importable:
  `cudnn_fp8s`, E4M3 Q, K, V with one descale per tensor, K and V smoothed as below, bf16 output; also timed
  kernel-only), with torch's own cuDNN library.
- `attn` and `dit` also take FlashAttention-3's Hopper forward where `flash_attn_3` (built by lab/fa3_build.py) is
  on PYTHONPATH: `fa3_bf16` (exact) and `fa3_fp8s` (the `--attention fa3fp8` engines' fvrt.plugins.fa3_attention:
  E4M3 Q, K, V with one descale per head, K and V smoothed by their token means; also timed kernel-only),
  `fa3_fp8s_fused` (the same under torch.compile: the quantization fused as in the engines) and `fa3fp8` (routed as
  the engines route it: FA3's bf16 kernel from 8,000 to its threshold, cuDNN below that and at head dim 64).

    PYTHONPATH=. python3 lab/gpu_attention.py --out DIR [--steps ceil,attn,dit,gemm,fa4] [--fa4-site /tmp/fa4]
    python lab/gpu_attention.py --out DIR --tiny --device cpu      # CPU dry run of the code paths

Writes DIR/attention.json after every step (a lost machine keeps what finished) and prints a table last.
FLOPs: attention 4 * Tq * Tk * H * D; GEMM 2 * M * K * N.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fvrt.builder.models import common
from fvrt.plugins import fa3_attention, fa4_attention, sage_attention
from fvrt.plugins import fp8_attention as fa

ATTN_SHAPES = {"s2_video_self": (1, 32, 32640, 128), "s1_video_self": (1, 32, 8160, 128)}
TINY_ATTN_SHAPES = {"tiny": (1, 2, 300, 64)}
# every stage-2 step of the distilled schedule (ltx-pipelines' STAGE_2_DISTILLED_SIGMA_VALUES but the final 0),
# stage 1's first and two of its later steps
DIT_SHAPES = {"stage2": ((16, 34, 60), (0.909375, 0.725, 0.421875)), "stage1": ((16, 17, 30), (1.0, 0.975, 0.725))}
TINY_DIT_SHAPES = {"tiny": ((3, 2, 3), (0.909375,))}
KEEP_EXACT_BLOCKS = (0, 43, 44, 45, 46, 47)  # as the FP8 linears (ltx-core's exclusion list)
ERR_ROWS = 1024
AUDIO_TOKENS, TEXT_TOKENS, FPS = 126, 1024, 24.0
SWEEP = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
# name -> (mode, quantize_smooth kwargs, launch kwargs); "fp8" is the engines' per-tensor kernel, "fp8s" the
# smoothed kernel with a scale per kernel tile, "_tok" with a scale per token (the op's, FP8S_SCALES)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, bool]]] = {
    "fp8": ("fp8", {}, {}),
    "fp8s": ("fp8s", {"qk": "fp8", "pv": "fp8", "tiles": True}, {"split_acc": True}),
    "fp8s_1acc": ("fp8s", {"qk": "fp8", "pv": "fp8", "tiles": True}, {"split_acc": False}),
    "fp8s_tok": ("fp8s", {"qk": "fp8", "pv": "fp8", "tiles": False}, {"split_acc": True}),
    "fp8s_int8": ("fp8s", {"qk": "int8", "pv": "fp8", "tiles": True}, {"split_acc": True}),
    "int8qk_bf16pv": ("fp8s", {"qk": "int8", "pv": "bf16", "tiles": False}, {"split_acc": True}),
}
DIT_ATTENTION = ("fp8", "fp8s", "fp8s_1acc", "fp8s_tok", "fp8s_int8", "int8qk_bf16pv")
DIT_KEEP_ENDS = ("fp8", "fp8s", "fp8s_int8")
DIT_FP8_LINEARS = ("", "fp8", "fp8s", "fp8s_int8")  # "": cuDNN attention


def smooth_args(qkw: dict[str, Any], d: int, config: dict[str, int] | None) -> dict[str, Any]:
    """quantize_smooth's keyword arguments for a variant: tiles from the launch config (or the op's)."""
    tiles = (config["BLOCK_M"], config["BLOCK_N"]) if config else fa.tile_blocks(d)
    return {"qk": qkw["qk"], "pv": qkw["pv"], "blocks": tiles if qkw["tiles"] else (1, 1)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def timed(fn: Any, dev: torch.device, reps: int = 10, warm: int = 3) -> float:
    """Median seconds of `reps` calls after `warm` (CUDA events on the GPU)."""
    for _ in range(warm):
        fn()
    if dev.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


class Results:
    def __init__(self, out: Path) -> None:
        self.path = out / "attention.json"
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
        }

    def put(self, step: str, value: Any) -> None:
        self.data[step] = value
        self.path.write_text(json.dumps(self.data, indent=1))


# ---- ceilings --------------------------------------------------------------------------------------------------


def fp8_pair(m: int, k: int, n: int, dev: torch.device, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random bf16 x [m, k], w [n, k] and their per-tensor E4M3 quantizations (w transposed: column-major)."""
    x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=dev, generator=g) / math.sqrt(k)).to(torch.bfloat16)
    sx, sw = x.float().abs().amax() / 448, w.float().abs().amax() / 448
    return x, w, (x.float() / sx).to(torch.float8_e4m3fn), (w.float() / sw).to(torch.float8_e4m3fn), sx, sw


def scaled_mm(x8: torch.Tensor, w8: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, fast: bool) -> torch.Tensor:
    return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast)


def step_ceil(dev: torch.device, tiny: bool) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(0)
    n = 512 if tiny else 8192
    res: dict[str, Any] = {}
    src = torch.empty(n * n * 16, dtype=torch.uint8, device=dev).random_(generator=g)  # 1 GiB at full size
    dst = torch.empty_like(src)
    res["copy_GBps"] = 2 * src.numel() / timed(lambda: dst.copy_(src), dev) / 1e9
    x, w, x8, w8, sx, sw = fp8_pair(n, n, n, dev, g)
    flops = 2 * n**3
    res["bf16_gemm_TFLOPs"] = flops / timed(lambda: x @ w.t(), dev) / 1e12
    if dev.type == "cuda":
        for fast in (False, True):
            res[f"fp8_gemm_TFLOPs_fast{int(fast)}"] = (
                flops / timed(lambda f=fast: scaled_mm(x8, w8, sx, sw, f), dev) / 1e12
            )
    return res


# ---- attention kernels -----------------------------------------------------------------------------------------


def qkv_random(shape: tuple[int, ...], dev: torch.device, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    b, h, t, d = shape
    return tuple(torch.randn(b, h, t, d, device=dev, generator=g).to(torch.bfloat16) for _ in range(3))


def qkv_trained_like(shape: tuple[int, ...], dev: torch.device, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Peaky, low-rank Q K^T (tokens in 64 clusters that attend within), K channel means (softmax-invariant),
    V channel means, and outlier channels in Q, K and V."""
    b, h, t, d = shape
    q, k, v = (torch.randn(b, h, t, d, device=dev, generator=g) for _ in range(3))
    centers = torch.randn(b, h, 64, d, device=dev, generator=g)
    cluster = torch.randint(0, 64, (t,), device=dev, generator=g)
    q, k = q + 1.5 * centers[:, :, cluster], k + 1.5 * centers[:, :, cluster]
    k = k + 4.0 * torch.randn(b, h, 1, d, device=dev, generator=g)
    v = v + 3.0 * torch.randn(b, h, 1, d, device=dev, generator=g)
    k[..., :2] *= 12.0
    q[..., 3] *= 8.0
    v[..., 5] *= 10.0
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def sdpa_with(backend: Any) -> Any:
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def variant_fn(name: str, config: dict[str, int] | None = None) -> Any:
    """Full call (quantization + kernel) of an 8-bit variant on [B, H, T, D] bf16 -> [B, H, T, D]."""
    mode, qkw, lkw = VARIANTS[name]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if mode == "fp8":
            return fa.attention(q, k, v, "fp8")
        kw = smooth_args(qkw, q.shape[-1], config)
        if q.device.type != "cuda":
            return fa.reference_smooth(q, k, v, **kw)
        z = fa.quantize_smooth(q, k, v, **kw)
        b, h, t, d = q.shape
        out = torch.empty((b, t, h, d), device=q.device, dtype=torch.bfloat16)
        return fa.launch_smooth(z, out, config=config, **lkw).transpose(1, 2)

    return run


def attention_fns(dev: torch.device) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    fns: dict[str, Any] = {}
    if dev.type == "cuda":
        fns["cudnn_bf16"] = sdpa_with(SDPBackend.CUDNN_ATTENTION)
        fns["flash2_bf16"] = sdpa_with(SDPBackend.FLASH_ATTENTION)
        if fa4_attention.supported(dev) is None:  # flash-attn-4 on PYTHONPATH: the engines' op, through torch.ops
            fns["fa4"] = fa4_attention.attention
        if sage_attention.supported(dev) is None:  # SageAttention 2 built by lab/sage_build.py: the engines' op
            fns["sage"] = sage_attention.attention  # as the engines: cuDNN below sage_attention.MIN_TOKENS
            fns["sage_all"] = sage_attention.kernel  # the op at every size
        if cudnn_fe_loaded():  # nvidia-cudnn-frontend on PYTHONPATH
            fns["cudnn_fp8s"] = cudnn_fp8s
        if fa3_loaded():  # FlashAttention-3 built by lab/fa3_build.py
            fns["fa3_bf16"] = fa3_bf16
            fns["fa3_fp8s"] = fa3_attention.kernel  # the --attention fa3fp8 engines' quantization and op
            fns["fa3fp8"] = fa3_attention.attention  # routed as the engines: FA3 bf16 from 8,000 tokens, else cuDNN
            # the quantization fused by Inductor, as AOTInductor fuses it in the engines
            fns["fa3_fp8s_fused"] = torch.compile(fa3_attention.kernel, fullgraph=True)
    else:
        fns["math_bf16"] = sdpa_with(SDPBackend.MATH)
    fns.update({n: variant_fn(n) for n in VARIANTS})
    return fns


def fa3_loaded() -> bool:
    """FlashAttention-3's extension importable (lab/fa3_build.py's TARGET on PYTHONPATH) and its op registered."""
    return fa3_attention.available() is None


def fa3_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3's bf16 forward on [B, H, T, D] (FA3 takes [B, T, H, D]: transposed views, no copies)."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(torch.ops.flash_attn_3.fwd(t(q), t(k), t(v), softmax_scale=q.shape[-1] ** -0.5)[0])


def fa3_kernel_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """FlashAttention-3's E4M3 kernel (the `--attention fa3fp8` engines' op) on inputs quantized once."""
    z, _ = fa3_attention.quantize(q, k, v)
    return lambda: fa3_attention.fa3fp8_attention(*z)


E4M3_MAX = fa3_attention.E4M3_MAX


def cudnn_fe_loaded() -> bool:
    """cuDNN's Python frontend importable (its FP8 attention runs on torch's own libcudnn)."""
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return False
    return True


_CUDNN_FP8: dict[tuple[int, ...], Any] = {}


def cudnn_fp8_graph(b: int, h: int, tq: int, tk: int, d: int) -> Any:
    """cuDNN's FP8 forward attention graph for contiguous [B, H, T, D] E4M3 Q, K, V (per-tensor descales), bf16
    output; built once per shape. Returns (graph, tensors by name, workspace, handle)."""
    import cudnn

    key = (b, h, tq, tk, d)
    if key in _CUDNN_FP8:
        return _CUDNN_FP8[key]
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    g = cudnn.pygraph(
        io_data_type=cudnn.data_type.BFLOAT16,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    fp8 = cudnn.data_type.FP8_E4M3
    t: dict[str, Any] = {}
    for name, tt in (("q", tq), ("k", tk), ("v", tk)):
        t[name] = g.tensor(name=name, dim=(b, h, tt, d), stride=(h * tt * d, tt * d, d, 1), data_type=fp8)
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[name] = g.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)
    o, _stats, amax_s, amax_o = g.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"],
        descale_q=t["descale_q"], descale_k=t["descale_k"], descale_v=t["descale_v"],
        descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
        generate_stats=False, attn_scale=d**-0.5, use_causal_mask=False,
    )  # fmt: skip
    o.set_output(True).set_dim((b, h, tq, d)).set_stride((h * tq * d, tq * d, d, 1))
    o.set_data_type(cudnn.data_type.BFLOAT16)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(cudnn.data_type.FLOAT)
    t |= {"o": o, "amax_s": amax_s, "amax_o": amax_o}
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
    _CUDNN_FP8[key] = (g, t, ws, handle)
    return _CUDNN_FP8[key]


def cudnn_fp8_quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
    """[B, H, T, D] -> cuDNN's FP8 inputs: contiguous E4M3 Q, K - mean_t K, V - mean_t V with per-tensor descales
    (amax / 448), P scaled by 448 into E4M3 (its values lie in [0, 1]); and V's token mean to add back."""
    smoothed, vm = fa3_attention.smooth(q, k, v)  # as the fa3fp8 engines smooth them
    xs = dict(zip("qkv", smoothed, strict=True))
    one = lambda x: torch.full((1, 1, 1, 1), x, device=q.device, dtype=torch.float32)  # noqa: E731
    pack: dict[str, torch.Tensor] = {"descale_s": one(1 / E4M3_MAX), "scale_s": one(E4M3_MAX), "scale_o": one(1.0)}
    for name, x in xs.items():
        scale = x.abs().amax().clamp_min(1e-12) / E4M3_MAX
        pack[name] = (x / scale).to(torch.float8_e4m3fn).contiguous()
        pack[f"descale_{name}"] = scale.reshape(1, 1, 1, 1).contiguous()
    return pack, vm


def cudnn_fp8_call(pack: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """cuDNN's FP8 attention on cudnn_fp8_quantize's tensors -> [B, H, Tq, D] bf16 (without V's mean)."""
    b, h, tq, d = q.shape
    g, t, ws, handle = cudnn_fp8_graph(b, h, tq, k.shape[2], d)
    out = torch.empty((b, h, tq, d), device=q.device, dtype=torch.bfloat16)
    amax = torch.empty((2, 1, 1, 1, 1), device=q.device, dtype=torch.float32)
    variant = {t[n]: pack[n] for n in pack} | {t["o"]: out, t["amax_s"]: amax[0], t["amax_o"]: amax[1]}
    g.execute(variant, ws, handle=handle)
    return out


def cudnn_fp8s(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Smoothed FP8 attention through cuDNN's frontend, quantization included: [B, H, T, D] -> [B, H, T, D]."""
    pack, vm = cudnn_fp8_quantize(q, k, v)
    return (cudnn_fp8_call(pack, q, k).float() + vm).to(q.dtype)


def cudnn_fp8_kernel_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """cuDNN's FP8 attention on inputs quantized once."""
    pack, _ = cudnn_fp8_quantize(q, k, v)
    return lambda: cudnn_fp8_call(pack, q, k)


def kernel_only(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Any = None) -> Any:
    """The kernel of an 8-bit variant on inputs quantized once (what the attention costs beyond its producers'
    fused quantization in an engine)."""
    mode, qkw, lkw = VARIANTS[name]
    b, h, t, d = q.shape
    out = torch.empty((b, t, h, d), device=q.device, dtype=torch.bfloat16)
    if mode == "fp8":
        args = fa.quantize_qkv(q, k, v)
        return lambda: fa.launch(*args, out)
    z = fa.quantize_smooth(q, k, v, **smooth_args(qkw, d, config))
    return lambda: fa.launch_smooth(z, out, config=config, **lkw)


def sage_kernel_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """SageAttention's SM90 kernel on inputs quantized once, as its `sageattn_qk_int8_pv_fp8_cuda_sm90` does them
    (K mean, per-thread INT8 Q/K, V padded to 128 keys and per-channel FP8): what the attention would cost if an
    engine fused the quantization into the Q/K/V producers, as Inductor does for fp8s. [B, H, T, D] in ("HND")."""
    from sageattention import sm90_compile
    from sageattention.quant import per_channel_fp8
    from sageattention.triton.quant_per_thread import per_thread_int8

    km = k.mean(dim=2, keepdim=True)
    q8, qs, k8, ks = per_thread_int8(q, k, km, tensor_layout="HND", BLKQ=64, WARPQ=16, BLKK=128, WARPK=128)
    pad = -k.shape[2] % 128
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)) if pad else v
    v8, vs, _ = per_channel_fp8(vp, tensor_layout="HND", smooth_v=False)
    o = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    run = sm90_compile.qk_int8_sv_f8_accum_f32_fuse_v_scale_attn_inst_buf
    return lambda: run(q8, k8, v8, o, qs, ks, vs, 1, 0, 3, scale, 0)  # HND, not causal, per-thread, no LSE


KERNEL_ONLY = {"sage_all": sage_kernel_only, "fa3_fp8s": fa3_kernel_only, "cudnn_fp8s": cudnn_fp8_kernel_only}


def step_attn(dev: torch.device, tiny: bool, only: str = "", tile_sweep: bool = True) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(1)
    shapes = TINY_ATTN_SHAPES if tiny else ATTN_SHAPES
    res: dict[str, Any] = {}
    fns = attention_fns(dev)
    if only:  # a subset, in the given order (names that cannot run here are left out)
        fns = {n: fns[n] for n in only.split(",") if n in fns}
    for sname, shape in shapes.items():
        _, h, t, d = shape
        flops = 4 * t * t * h * d
        row: dict[str, Any] = {}
        for data, make in (("random", qkv_random), ("trained_like", qkv_trained_like)):
            q, k, v = make(shape, dev, g)
            rows = min(ERR_ROWS, t)
            exact = F.scaled_dot_product_attention(q[:, :, :rows].float(), k.float(), v.float())
            for name, fn in fns.items():
                try:
                    out = fn(q, k, v)[:, :, :rows]
                    row.setdefault(name, {})[f"rel_err_{data}"] = rel(out, exact)
                    row[name][f"nan_{data}"] = bool(out.isnan().any())
                except Exception as e:  # a variant that fails is a result
                    row.setdefault(name, {})[f"error_{data}"] = f"{type(e).__name__}: {e}"[:300]
            if data == "random":
                for name, fn in fns.items():
                    if f"error_{data}" in row[name]:
                        continue
                    s = timed(lambda f=fn: f(q, k, v), dev)
                    row[name].update(ms=s * 1e3, TFLOPs=flops / s / 1e12)
                    if dev.type == "cuda" and name in VARIANTS:
                        s = timed(kernel_only(name, q, k, v), dev)
                        row[name].update(kernel_ms=s * 1e3, kernel_TFLOPs=flops / s / 1e12)
                    elif dev.type == "cuda" and name in KERNEL_ONLY:
                        try:
                            s = timed(KERNEL_ONLY[name](q, k, v), dev)
                            row[name].update(kernel_ms=s * 1e3, kernel_TFLOPs=flops / s / 1e12)
                        except Exception as e:  # the package's internals moved: the full call's figures stand
                            row[name]["kernel_error"] = f"{type(e).__name__}: {e}"[:300]
                if tile_sweep and dev.type == "cuda" and not tiny and sname == "s2_video_self":
                    sweep = {}
                    for cfg in SWEEP:
                        c = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg, strict=True))
                        for name in ("fp8s", "fp8s_tok"):
                            try:
                                s = timed(kernel_only(name, q, k, v, c), dev, reps=5, warm=2)
                                sweep[f"{name} {cfg}"] = round(s * 1e3, 3)
                            except Exception as e:
                                sweep[f"{name} {cfg}"] = f"{type(e).__name__}: {e}"[:200]
                    row["sweep_kernel_ms"] = sweep
        res[sname] = row
    return res


# ---- the DiT ---------------------------------------------------------------------------------------------------


class AttentionSwitch:
    """Replaces `common.sdpa` (every attention call of the DiT) by a chosen function, per block: blocks in
    `exact` keep bf16 cuDNN."""

    def __init__(self, dit: torch.nn.Module, exact_fn: Any) -> None:
        self.block = -1
        self.fn: Any = None
        self.exact: tuple[int, ...] = ()
        self.exact_fn = exact_fn
        self.original = common.sdpa
        for i, blk in enumerate(dit.transformer_blocks):
            blk.register_forward_pre_hook(functools.partial(self._enter, i))
        common.sdpa = self

    def _enter(self, i: int, *_: Any) -> None:
        self.block = i

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fn is None or self.block in self.exact:
            return self.exact_fn(q, k, v)
        return self.fn(q, k, v)

    def set(self, fn: Any, exact: tuple[int, ...] = ()) -> None:
        self.fn, self.exact = fn, exact


def dit_inputs(cfg: dict[str, Any], fhw: tuple[int, int, int], sigma: float, dev: torch.device, tiny: bool) -> dict:
    from fvrt.builder.models import dit as D

    f, h, w = fhw
    g = torch.Generator(device=dev).manual_seed(2)
    tr = cfg["transformer"]
    dv = tr["num_attention_heads"] * tr["attention_head_dim"]
    da = tr["audio_num_attention_heads"] * tr["audio_attention_head_dim"]
    nv, na = f * h * w, 12 if tiny else AUDIO_TOKENS
    dt = torch.bfloat16
    mask = torch.ones(1, nv, device=dev)
    sig = torch.tensor([sigma], device=dev)
    return {
        "video_latent": torch.randn(1, nv, 128, device=dev, generator=g).to(dt),
        "audio_latent": torch.randn(1, na, 128, device=dev, generator=g).to(dt),
        "video_timesteps": mask * sig,
        "audio_timesteps": torch.ones(1, na, device=dev) * sig,
        "video_sigma": sig,
        "audio_sigma": sig,
        "video_positions": D.video_positions(f, h, w, FPS, device=dev).to(dt),
        "audio_positions": D.audio_positions(na, device=dev),
        "video_context": torch.randn(1, TEXT_TOKENS, dv, device=dev, generator=g).to(dt),
        "audio_context": torch.randn(1, TEXT_TOKENS, da, device=dev, generator=g).to(dt),
    }


def linear_shapes(dit: torch.nn.Module, inputs: dict) -> dict[str, int]:
    """(M, K, N) of every Linear call in one pass, with counts."""
    seen: Counter[str] = Counter()

    def hook(m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        seen[f"{x.numel() // x.shape[-1]}x{m.in_features}x{m.out_features}"] += 1

    hs = [m.register_forward_pre_hook(hook) for m in dit.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        dit(**inputs)
    for hd in hs:
        hd.remove()
    return dict(seen.most_common())


def step_dit(dev: torch.device, tiny: bool, res: Results, args: argparse.Namespace) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    from fvrt.builder.checkpoint import ModelVersion, build_random
    from fvrt.builder.configs import full_config, tiny_config
    from fvrt.builder.quant.calibrate import quantize_model
    from fvrt.builder.quant.recipe import QuantRecipe

    version = ModelVersion("2.3")
    cfg = tiny_config(version) if tiny else full_config(version)
    t = time.perf_counter()
    dit = build_random("dit", cfg, dtype=torch.bfloat16, device=dev, seed=0).eval()
    out: dict[str, Any] = {"build_s": round(time.perf_counter() - t, 1)}
    exact_fn = sdpa_with(SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH)
    switch = AttentionSwitch(dit, exact_fn)
    shapes = TINY_DIT_SHAPES if tiny else DIT_SHAPES
    n_blocks = len(dit.transformer_blocks)
    keep = tuple(i for i in KEEP_EXACT_BLOCKS if i < n_blocks) if not tiny else (0, n_blocks - 1)
    cases = [(s, fhw, sig) for s, (fhw, sigmas) in shapes.items() for sig in sigmas]
    first = cases[0]
    inputs = {c: dit_inputs(cfg, c[1], c[2], dev, tiny) for c in cases}
    out["linear_calls"] = linear_shapes(dit, inputs[first])
    res.put("dit", out)
    refs: dict[Any, torch.Tensor] = {}

    def run_variant(label: str, fn: Any, exact: tuple[int, ...] = ()) -> None:
        switch.set(fn, exact)
        row: dict[str, Any] = {}
        try:
            with torch.no_grad():
                for c in cases:
                    v, _a = dit(**inputs[c])
                    if c == first:  # warm (Triton compiles) then time one pass
                        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
                        sync()
                        t0 = time.perf_counter()
                        v, _a = dit(**inputs[c])
                        sync()
                        row["pass_s"] = round(time.perf_counter() - t0, 3)
                    key = f"{c[0]} sigma {c[2]}"
                    if label == "bf16_cudnn":
                        refs[c] = v.float().cpu()
                    else:
                        row[f"cos {key}"] = round(cos(v.float().cpu(), refs[c]), 5)
                        row[f"rel {key}"] = round(rel(v.float().cpu(), refs[c]), 4)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        out.setdefault("variants", {})[label] = row
        res.put("dit", out)
        print(f"[dit] {label}: {row}", flush=True)

    fns = attention_fns(dev)

    def listed(text: str) -> list[str]:  # the named variants that can run here ('-': none)
        names = [x for x in text.split(",") if x != "-"] if text else []
        for x in (x for x in names if x not in fns):
            print(f"[dit] {x}: cannot run here (its package is not importable), left out", flush=True)
        return [x for x in names if x in fns]

    run_variant("bf16_cudnn", None)
    if dev.type == "cuda" and args.dit_flash:
        run_variant("bf16_flash2", fns["flash2_bf16"])
    for name in listed(args.dit_attention):
        run_variant(f"attn_{name}", fns[name])
    for name in listed(args.dit_keep_ends):
        run_variant(f"attn_{name}_keep_ends", fns[name], keep)
    fp8_lin = args.dit_fp8_linears.split(",")
    if not args.dit_fp8_linears:
        common.sdpa = switch.original
        return out
    # the FP8 linears of the engines (blocks 1-42 by ltx-core's exclusion list), calibrated on these inputs
    t = time.perf_counter()
    switch.set(None)
    report = quantize_model(dit, QuantRecipe.named("fp8"), [inputs[c] for c in cases], method="hooks")
    out["fp8_linears"] = {"layers": len(report.layers), "calibrate_s": round(time.perf_counter() - t, 1)}
    for name in fp8_lin:
        run_variant(f"fp8lin_attn_{name}" if name else "fp8lin", fns[name] if name else None)
    if args.dit_fast_accum:
        real_scaled_mm = torch._scaled_mm
        torch._scaled_mm = functools.partial(real_scaled_mm, use_fast_accum=True)
        try:
            run_variant("fp8lin_fastacc", None)
            run_variant("fp8lin_fastacc_attn_fp8s", fns["fp8s"])
        finally:
            torch._scaled_mm = real_scaled_mm
    common.sdpa = switch.original
    return out


# ---- GEMMs at the DiT's shapes ---------------------------------------------------------------------------------


def step_gemm(dev: torch.device, tiny: bool, calls: dict[str, int]) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(3)
    weighted = sorted(calls.items(), key=lambda kv: -math.prod(map(int, kv[0].split("x"))) * kv[1])
    res: dict[str, Any] = {}
    for key, count in weighted[:6]:
        m, k, n = map(int, key.split("x"))
        x, w, x8, w8, sx, sw = fp8_pair(m, k, n, dev, g)
        exact = x.float() @ w.float().t()
        deq = (x8.float() * sx) @ (w8.float() * sw).t()  # the FP8 operands, exact arithmetic
        flops = 2 * m * k * n
        row: dict[str, Any] = {"calls_per_pass": count}
        s = timed(lambda: F.linear(x, w), dev)
        row.update(bf16_ms=s * 1e3, bf16_TFLOPs=flops / s / 1e12, bf16_rel=rel(F.linear(x, w), exact))
        if dev.type == "cuda":
            for fast in (False, True):
                s = timed(lambda f=fast: scaled_mm(x8, w8, sx, sw, f), dev)
                y = scaled_mm(x8, w8, sx, sw, fast)
                row.update(
                    {
                        f"fp8_fast{int(fast)}_ms": s * 1e3,
                        f"fp8_fast{int(fast)}_TFLOPs": flops / s / 1e12,
                        f"fp8_fast{int(fast)}_rel": rel(y, exact),
                        f"fp8_fast{int(fast)}_rel_vs_fp8_operands": rel(y, deq),
                    }
                )
        res[key] = row
    return res


# ---- FlashAttention-4 ------------------------------------------------------------------------------------------


def fa4_child(tiny: bool) -> None:
    """In the subprocess: FA4's forward vs cuDNN at the attention shapes; prints one JSON line."""
    from flash_attn.cute import flash_attn_func  # only with --fa4-site
    from torch.nn.attention import SDPBackend

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(4)
    cudnn = sdpa_with(SDPBackend.CUDNN_ATTENTION)
    res: dict[str, Any] = {}
    for sname, shape in (TINY_ATTN_SHAPES if tiny else ATTN_SHAPES).items():
        _, h, t, d = shape
        flops = 4 * t * t * h * d
        q, k, v = qkv_random(shape, dev, g)
        ql, kl, vl = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # FA4 takes [B, T, H, D]
        t0 = time.perf_counter()
        o = flash_attn_func(ql, kl, vl)
        o = o[0] if isinstance(o, tuple) else o
        torch.cuda.synchronize()
        row = {"first_call_s": round(time.perf_counter() - t0, 2)}
        exact = F.scaled_dot_product_attention(q[:, :, :ERR_ROWS].float(), k.float(), v.float())
        row["rel_err_random"] = rel(o.transpose(1, 2)[:, :, :ERR_ROWS], exact)
        for name, fn in (("fa4_bf16", lambda: flash_attn_func(ql, kl, vl)), ("cudnn_bf16", lambda: cudnn(q, k, v))):
            s = timed(fn, dev)
            row[f"{name}_ms"], row[f"{name}_TFLOPs"] = s * 1e3, flops / s / 1e12
        res[sname] = row
    print("FA4_JSON " + json.dumps(res), flush=True)


def step_fa4(site: str, tiny: bool) -> dict[str, Any]:
    if not (Path(site) / "flash_attn").is_dir():
        return {"skipped": f"no flash_attn under {site}"}
    # nvidia-cutlass-dsl puts its `cutlass` package on sys.path with a .pth file, which a --target folder on
    # PYTHONPATH does not run: name the folder itself
    paths = [site, f"{site}/nvidia_cutlass_dsl/dsl_packages", os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=":".join(paths))
    args = [sys.executable, __file__, "--fa4-child"] + (["--tiny"] if tiny else [])
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=420)
    for line in p.stdout.splitlines():
        if line.startswith("FA4_JSON "):
            return json.loads(line[len("FA4_JSON ") :])
    return {"failed": f"exit {p.returncode}", "tail": (p.stdout + p.stderr)[-2000:]}


# ---- table -----------------------------------------------------------------------------------------------------


def table(data: dict[str, Any]) -> str:
    lines = [f"{data['gpu']}, torch {data['torch']}, {data['date']}"]
    if "ceil" in data:
        lines.append("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in data["ceil"].items()))
    for sname, row in data.get("attn", {}).items():
        lines.append(f"attention {sname}: name | ms (kernel ms) | TFLOP/s | rel err random / trained-like")
        for name, r in row.items():
            if name == "sweep_kernel_ms":
                lines.append(f"  sweep: {r}")
                continue
            k = f" ({r['kernel_ms']:.2f})" if "kernel_ms" in r else ""
            lines.append(
                f"  {name:14s} {r.get('ms', float('nan')):7.2f}{k} {r.get('TFLOPs', float('nan')):6.0f} "
                f"{r.get('rel_err_random', float('nan')):.4f} / {r.get('rel_err_trained_like', float('nan')):.4f}"
                + (f" ERR {r.get('error_random', r.get('error_trained_like'))}" if "error_random" in r else "")
            )
    for label, r in data.get("dit", {}).get("variants", {}).items():
        lines.append(f"  dit {label:38s} " + " ".join(f"{k}={v}" for k, v in r.items()))
    for key, r in data.get("gemm", {}).items():
        lines.append(
            f"  gemm {key} x{r['calls_per_pass']}: bf16 {r.get('bf16_TFLOPs', 0):.0f}, fp8 "
            f"{r.get('fp8_fast0_TFLOPs', 0):.0f} (rel {r.get('fp8_fast0_rel', 0):.4f}), fast-acc "
            f"{r.get('fp8_fast1_TFLOPs', 0):.0f} (rel {r.get('fp8_fast1_rel', 0):.4f}) TFLOP/s"
        )
    if "fa4" in data:
        lines.append(f"  fa4: {data['fa4']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/attn")
    ap.add_argument("--steps", default="ceil,attn,dit,gemm,fa4")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and model: a dry run of every code path")
    ap.add_argument("--fa4-site", default="/tmp/fa4", help="a folder holding flash-attn-4 and its packages")
    ap.add_argument("--fa4-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dit-attention", default=",".join(DIT_ATTENTION), help="attention-only DiT runs ('-': none)")
    ap.add_argument("--dit-keep-ends", default=",".join(DIT_KEEP_ENDS), help="the same, blocks 0 and 43-47 exact")
    ap.add_argument(
        "--dit-fp8-linears", default=",".join(DIT_FP8_LINEARS), help="with FP8 linears ('' first: cuDNN; empty: none)"
    )
    ap.add_argument("--dit-flash", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--attn-only", default="", help="attn: only these kernels (comma list; default: all)")
    ap.add_argument("--attn-sweep", action=argparse.BooleanOptionalAction, default=True, help="attn: fp8s tiles")
    ap.add_argument("--dit-fast-accum", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    if args.fa4_child:
        fa4_child(args.tiny)
        return
    dev = torch.device(args.device)
    res = Results(Path(args.out))
    steps = args.steps.split(",")
    calls: dict[str, int] = {}
    for step in steps:
        t = time.perf_counter()
        print(f"=== {step}", flush=True)
        try:
            if step == "ceil":
                res.put("ceil", step_ceil(dev, args.tiny))
            elif step == "attn":
                res.put("attn", step_attn(dev, args.tiny, args.attn_only, args.attn_sweep))
            elif step == "dit":
                calls = step_dit(dev, args.tiny, res, args)["linear_calls"]
            elif step == "gemm":
                res.put("gemm", step_gemm(dev, args.tiny, calls or {"8160x4096x4096": 1}))
            elif step == "fa4" and dev.type == "cuda":
                res.put("fa4", step_fa4(args.fa4_site, args.tiny))
        except Exception as e:  # the next steps still run
            res.put(f"{step}_error", f"{type(e).__name__}: {e}"[:500])
            print(f"[{step}] {type(e).__name__}: {e}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        res.put(f"{step}_s", round(time.perf_counter() - t, 1))
    print(table(res.data), flush=True)


if __name__ == "__main__":
    main()
