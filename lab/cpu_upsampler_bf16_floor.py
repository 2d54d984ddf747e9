"""Is the upsampler engine's 1.47e-2 vs eager bf16 (H100) an engine defect or the model's bf16 floor?

Full-size random LTX-2.3 latent upsampler on a small latent: eager bf16 vs eager fp32, Inductor bf16 vs fp32
and Inductor vs eager bf16 (relative L2 errors). Runs on CPU in about a minute; `--device cuda` on the GPU.
"""

import argparse
import time

import torch

from fvrt.builder.checkpoint import ModelVersion, build_random
from fvrt.builder.configs import upsampler_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="1,128,3,8,8", help="latent shape")
    args = ap.parse_args()
    model = build_random("upsampler", upsampler_config(ModelVersion.LTX23), seed=0, device=args.device).eval()
    x = torch.randn(*map(int, args.shape.split(",")), device=args.device, generator=torch.Generator(args.device))
    with torch.no_grad():
        t = time.perf_counter()
        y32 = model(x)
        print(f"eager fp32 {time.perf_counter() - t:.2f} s")
        model = model.to(torch.bfloat16)
        yb = model(x.bfloat16())
        yc = torch.compile(model)(x.bfloat16())
    print(f"eager bf16 vs fp32 {rel(yb, y32):.3e}")
    print(f"inductor bf16 vs fp32 {rel(yc, y32):.3e}")
    print(f"inductor vs eager bf16 {rel(yc, yb):.3e}")


if __name__ == "__main__":
    main()
