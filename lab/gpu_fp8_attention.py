"""FP8 attention on the GPU (issues 5 and 6): correctness against fp32 and against the kernel's torch emulation,
speed against bf16 cuDNN / FlashAttention-2 SDPA at the LTX-2.3 shapes, a tile sweep, and an AOTInductor round
trip (the op compiled into a package, loaded, replayed in a CUDA graph).

    python lab/gpu_fp8_attention.py --out /tmp/fa8 [--sweep]

Prints a table last and writes fa8.json. FLOPs counted as 4 * Tq * Tk * H * D (the two matmuls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fvrt.plugins import fp8_attention as fa

# name -> (B, H, Tq, Tk, D): DiT stage 2 / stage 1 video self-attention, video->text, audio self, audio->video
SHAPES = {
    "s2_video_self": (1, 32, 32640, 32640, 128),
    "s1_video_self": (1, 32, 8160, 8160, 128),
    "s2_video_text": (1, 32, 32640, 1024, 128),
    "audio_self": (1, 32, 126, 126, 64),
    "audio_to_video": (1, 32, 126, 32640, 64),
    "tail_odd": (2, 3, 1000, 777, 128),
    "tiny_d8": (1, 2, 64, 50, 8),
}
SWEEP = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 4, 3),
    (64, 128, 4, 3),
    (128, 256, 8, 2),
]
ERR_ROWS = 1024  # query rows compared against fp32 (the emulation materialises [H, rows, Tk] scores)


def timed(fn: Any, reps: int = 10, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
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


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def inputs(shape: tuple[int, ...], peaky: float, seed: int) -> tuple[torch.Tensor, ...]:
    b, h, tq, tk, d = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, tq, d, device="cuda", generator=g, dtype=torch.bfloat16) * peaky
    k = torch.randn(b, h, tk, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, h, tk, d, device="cuda", generator=g, dtype=torch.bfloat16)
    return q, k, v


def kernel_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    pre = fa.quantize_qkv(q, k, v)
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], device="cuda", dtype=torch.bfloat16)
    return lambda: fa.launch(*pre, out)


def accuracy(shape: tuple[int, ...], peaky: float, seed: int) -> dict[str, float]:
    q, k, v = inputs(shape, peaky, seed)
    got = fa.attention(q, k, v)[:, :, :ERR_ROWS]
    qs = q[:, :, :ERR_ROWS]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        exact = F.scaled_dot_product_attention(qs.float(), k.float(), v.float())
    emul = fa.reference(q.float(), k.float(), v.float(), rows=ERR_ROWS)  # fp32 out; scales from all rows
    bf16 = F.scaled_dot_product_attention(qs, k, v)
    return {
        "kernel_vs_fp32": rel(got, exact),
        "kernel_cos_fp32": cos(got, exact),
        "emul_vs_fp32": rel(emul, exact),
        "kernel_vs_emul": rel(got, emul),
        "bf16_vs_fp32": rel(bf16, exact),
    }


def _int8_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric INT8 with one scale per `block` consecutive tokens (per batch and head), dequantized (fp32)."""
    b, h, n, d = t.shape
    pad = -n % block
    tp = F.pad(t.float(), (0, 0, 0, pad)).view(b, h, (n + pad) // block, block, d)
    scale = (tp.abs().amax(dim=(-1, -2), keepdim=True) / 127).clamp_min(1e-30)
    return ((tp / scale).round().clamp(-127, 127) * scale).view(b, h, n + pad, d)[:, :, :n]


def _e4m3(t: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """E4M3 with one scale per tensor (dim None) or per slice reduced over `dim`, dequantized (fp32)."""
    t = t.float()
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (amax / fa.E4M3_MAX).clamp_min(1e-30)
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


def emulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int, qk: str, pv: str) -> torch.Tensor:
    """Attention of the first `rows` queries with Q K^T in `qk` ("exact", "fp8": per-tensor E4M3, "int8": K
    smoothed by its token mean, INT8 with per-64-query / per-128-key block scales) and P V in `pv` ("exact",
    "fp8": P scaled by 448 against the row max and V per-tensor, "fp8c": V with per-channel scales)."""
    d = q.shape[-1]
    if qk == "fp8":
        qq, kq = _e4m3(q)[:, :, :rows], _e4m3(k)
    elif qk == "int8":  # softmax is invariant to a per-query constant: q . mean(k) is one
        qq, kq = _int8_blocks(q, 64)[:, :, :rows], _int8_blocks(k.float() - k.float().mean(-2, keepdim=True), 128)
    else:
        qq, kq = q[:, :, :rows].float(), k.float()
    s = qq @ kq.transpose(-1, -2) / d**0.5
    p = torch.exp(s - s.amax(-1, keepdim=True))
    l_sum = p.sum(-1, keepdim=True)
    if pv == "exact":
        return (p @ v.float()) / l_sum
    vq = _e4m3(v) if pv == "fp8" else _e4m3(v, dim=(-2,))
    return ((p * fa.P_SCALE).to(torch.float8_e4m3fn).float() / fa.P_SCALE @ vq) / l_sum


DECOMPOSE = [("fp8", "exact"), ("exact", "fp8"), ("exact", "fp8c"), ("fp8", "fp8"), ("int8", "exact"),
             ("int8", "fp8"), ("int8", "fp8c")]  # fmt: skip


def decompose(res: dict[str, Any]) -> None:
    """Where FP8 attention's error comes from: each quantized part alone against fp32, and INT8 Q K^T."""
    for name in ("s2_video_self", "s1_video_self"):
        for peaky, k_offset in ((1.0, 0.0), (3.0, 0.0), (1.0, 2.0)):
            q, k, v = inputs(SHAPES[name], peaky, seed=2)
            k = k + k_offset  # a shared key direction (a softmax no-op that costs per-tensor scales range)
            exact = emulate(q, k, v, ERR_ROWS, "exact", "exact")
            row = {f"qk={a} pv={b}": rel(emulate(q, k, v, ERR_ROWS, a, b), exact) for a, b in DECOMPOSE}
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                row["cudnn bf16"] = rel(F.scaled_dot_product_attention(q, k, v)[:, :, :ERR_ROWS], exact)
            key = f"{name}/q*{peaky:g}/k+{k_offset:g}"
            res.setdefault("decompose", {})[key] = row
            print(key, {a: round(b, 4) for a, b in row.items()}, flush=True)
            del q, k, v, exact
            torch.cuda.empty_cache()


def speed(shape: tuple[int, ...]) -> dict[str, float]:
    b, h, tq, tk, d = shape
    flop = 4.0 * b * h * tq * tk * d
    q, k, v = inputs(shape, 1.0, 0)
    row: dict[str, float] = {}
    for name, backend in (("cudnn_bf16", SDPBackend.CUDNN_ATTENTION), ("flash_bf16", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                row[f"{name}_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError:
            row[f"{name}_s"] = float("nan")
    if d in fa.CONFIGS:
        row["kernel_s"] = timed(kernel_only(q, k, v))
    row["with_quant_s"] = timed(lambda: fa.attention(q, k, v))
    for key in list(row):
        row[key.replace("_s", "_tflops")] = flop / row[key] / 1e12
    return row


def aoti_round_trip(out_dir: Path) -> dict[str, Any]:
    """common.Attention (video-sized heads) exported with FP8 attention, AOTInductor-compiled with the builder's
    own options, loaded, run, replayed in a CUDA graph; compared with eager (same kernel) and fp32."""
    from torch._inductor.package import package_aoti

    from fvrt.builder.backends import cxx
    from fvrt.builder.backends.aoti import attention_backend, compile_program
    from fvrt.builder.models.common import Attention, kernel_attention

    torch.manual_seed(0)
    m = Attention(512, None, 4, 128).cuda().to(torch.bfloat16).eval()
    x = torch.randn(1, 3000, 512, device="cuda", dtype=torch.bfloat16)
    with attention_backend("fp8", torch.device("cuda")):
        ep = torch.export.export(m, (x,))
        t0 = time.perf_counter()
        files = compile_program(ep, (x,), cxx.select(None).path)  # $FVRT_CXX (g++-12 on the GPU host)
        compile_s = time.perf_counter() - t0
    pkg = out_dir / "attn_fp8.pt2"
    package_aoti(str(pkg), files)
    runner = torch._inductor.aoti_load_package(str(pkg))
    with torch.no_grad():
        got = runner(x)
        with kernel_attention("fp8"):
            eager = m(x)
        exact = m.float()(x.float())
        m.to(torch.bfloat16)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        runner(static_x)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static_out = runner(static_x)
        static_x.copy_(x * 0.5)
        graph.replay()
        ref_half = runner(x * 0.5)
    graph_ok = torch.equal(static_out, ref_half)
    return {
        "compile_s": compile_s,
        "engine_vs_eager": rel(got, eager),
        "engine_vs_fp32": rel(got, exact),
        "eager_vs_fp32": rel(eager, exact),
        "graph_replay_equal": graph_ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", action="store_true", help="time every tile config at the stage-2 shape")
    ap.add_argument("--skip-aoti", action="store_true")
    ap.add_argument("--decompose", action="store_true", help="only: error of each quantized part (emulated)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "configs": {}}

    def save() -> None:
        (args.out / "fa8.json").write_text(json.dumps(res, indent=1, default=str))

    if args.decompose:
        decompose(res)
        save()
        cols = list(next(iter(res["decompose"].values())))
        print("\n| case | " + " | ".join(cols) + " |\n|---" * 1 + "|---" * len(cols) + "|")
        for key, row in res["decompose"].items():
            print(f"| {key} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
        return
    default_cfg = dict(fa.CONFIGS[128])
    if args.sweep:
        q, k, v = inputs(SHAPES["s2_video_self"], 1.0, 0)
        flop = 4.0 * 32 * 32640 * 32640 * 128
        for bm, bn, w, st in SWEEP:
            fa.CONFIGS[128] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
            name = f"{bm}x{bn} w{w} s{st}"
            try:
                t = timed(kernel_only(q, k, v), reps=5, warm=2)
                res["configs"][name] = {"s": t, "tflops": flop / t / 1e12}
            except Exception as e:  # out of shared memory / registers: recorded, next config
                res["configs"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(name, res["configs"][name], flush=True)
            save()
        res["best"] = min((v["s"], n) for n, v in res["configs"].items() if "s" in v)
        print("best", res["best"], flush=True)
        fa.CONFIGS[128] = default_cfg
        del q, k, v
    for name, shape in SHAPES.items():
        for peaky in (1.0, 3.0):
            key = f"{name}/q*{peaky:g}"
            try:
                res.setdefault("accuracy", {})[key] = accuracy(shape, peaky, seed=1)
            except Exception as e:
                res.setdefault("accuracy", {})[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(key, res["accuracy"][key], flush=True)
            torch.cuda.empty_cache()
        if name in ("s2_video_self", "s1_video_self", "s2_video_text", "audio_to_video"):
            res.setdefault("speed", {})[name] = speed(shape)
            print(name, res["speed"][name], flush=True)
        save()
    if not args.skip_aoti:
        try:
            res["aoti"] = aoti_round_trip(args.out)
        except Exception as e:
            res["aoti"] = {"error": f"{type(e).__name__}: {e}"[:600]}
        print("aoti", res["aoti"], flush=True)
        save()
    print("\n| shape | kernel s | TFLOP/s | +quant (eager) s | cuDNN bf16 s | FA2 bf16 s |")
    print("|---|---|---|---|---|---|")
    for name, r in res.get("speed", {}).items():
        print(f"| {name} | {r.get('kernel_s', float('nan')):.4f} | {r.get('kernel_tflops', 0):.0f} | "
              f"{r['with_quant_s']:.4f} | {r['cudnn_bf16_s']:.4f} | {r['flash_bf16_s']:.4f} |")  # fmt: skip
    print("\n| case | kernel/fp32 | emul/fp32 | kernel/emul | bf16/fp32 | cos |")
    print("|---|---|---|---|---|---|")
    for key, r in res.get("accuracy", {}).items():
        if "error" in r:
            print(f"| {key} | {r['error'][:80]} |")
            continue
        print(f"| {key} | {r['kernel_vs_fp32']:.4f} | {r['emul_vs_fp32']:.4f} | {r['kernel_vs_emul']:.4f} | "
              f"{r['bf16_vs_fp32']:.4f} | {r['kernel_cos_fp32']:.5f} |")  # fmt: skip
    save()


if __name__ == "__main__":
    main()
