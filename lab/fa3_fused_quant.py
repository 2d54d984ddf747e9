"""The fa3fp8 attention as an engine runs it: `fvrt.plugins.fa3_attention.kernel` (K/V smoothing, E4M3 quantization
with per-(batch, head) descales, the FlashAttention-3 FP8 op, V's mean added back) under torch.compile, so that
Inductor fuses the quantization as AOTInductor does in the DiT block engines; timed against torch SDPA on cuDNN at
the DiT's video self-attention shapes ([1, 32, T, 128] bf16, random), with the relative L2 error against cuDNN.

Needs a Hopper GPU and FlashAttention-3 built by lab/fa3_build.py on PYTHONPATH. Prints one line per size.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fvrt.plugins import fa3_attention


def mean_ms(fn, *args: torch.Tensor, n: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="32640,8160", help="comma list of sequence lengths")
    args = ap.parse_args()
    if why := fa3_attention.supported(torch.device("cuda")):
        raise SystemExit(f"error: {why}")
    torch.manual_seed(0)
    fused = torch.compile(fa3_attention.kernel, fullgraph=True)
    for t in (int(x) for x in args.tokens.split(",")):
        q, k, v = (torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref, out = cudnn(q, k, v).float(), fused(q, k, v).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        tc, tf = mean_ms(cudnn, q, k, v), mean_ms(fused, q, k, v)
        print(f"T={t} cudnn {tc:.2f} ms  fa3fp8 compiled (quant+op) {tf:.2f} ms  x{tc / tf:.2f}  rel {rel:.4f}")


if __name__ == "__main__":
    main()
