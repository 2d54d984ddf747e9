"""How far in time one latent frame reaches through the full-size LTX-2.3 video decoder (random weights, CPU fp32,
1x1 latent pixels so it runs in seconds): which output frames change when latent frame k is perturbed. It decides
whether the decode can be cut into exact temporal chunks (each chunk then needs this reach as its halo).

    python lab/vae_temporal_reach.py [--frames 16] [--latent-frames 0,8,15]
"""

from __future__ import annotations

import argparse
import time

import torch

from fvrt.builder.checkpoint import ModelVersion, build_random
from fvrt.builder.configs import full_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16, help="latent frames (16: 121 frames at 1080p)")
    ap.add_argument("--latent-frames", default="0,8,15", help="latent frames to perturb, comma-separated")
    args = ap.parse_args()
    decoder = build_random("video_decoder", full_config(ModelVersion.LTX23), dtype=torch.float32,
                           device=torch.device("cpu"), seed=0)  # fmt: skip
    latent = torch.randn(1, 128, args.frames, 1, 1, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.no_grad():
        base = decoder(latent)
    print(f"decoder output {tuple(base.shape)} in {time.perf_counter() - t0:.1f} s")
    floor = 1e-6 * float(base.abs().max())
    for k in (int(x) for x in args.latent_frames.split(",")):
        bumped = latent.clone()
        bumped[:, :, k] += 1.0
        with torch.no_grad():
            change = (decoder(bumped) - base).abs().amax(dim=(0, 1, 3, 4))
        hit = (change > floor).nonzero().flatten().tolist()
        print(f"latent frame {k}: output frames {hit[0]}-{hit[-1]} change ({len(hit)} of {base.shape[2]})")


if __name__ == "__main__":
    main()
