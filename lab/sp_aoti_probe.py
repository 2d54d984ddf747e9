"""Can AOTInductor compile the sequence-parallel DiT's per-rank hot graph with the collectives inside?

Each of `--world-size` ranks (fvrt.runtime.distributed.run_ranks) builds the same tiny random LTX-2.3 DiT (4 heads),
wraps it in `SequenceParallelDiT`, exports `forward_prepared` on its own shard of the video tokens
(`_c10d_functional` all-to-all / all-gather ops in the graph), compiles it with `aoti_compile_and_package`, loads
the package and runs it in the live process group, then prints the max abs difference from eager.

CPU, gloo (the default): run 2026-12-06 at world size 2, 45 video tokens (padded to 46): both ranks built and ran
their package (130-230 s of compile each on a loaded 2-core machine, two runs), max abs <= 1e-6 (video and
audio) vs eager fp32. `--device cuda` (NCCL, one GPU per rank) is written against the same API but has not run.
"""

import argparse
import tempfile
import time

import torch

from fvrt.builder.checkpoint import ModelVersion, build_random
from fvrt.builder.configs import tiny_config
from fvrt.builder.models import dit as D
from fvrt.builder.parallel import SequenceParallelDiT, shard_stream
from fvrt.runtime.distributed import run_ranks

GRID = (3, 3, 5)  # latent (F, H, W): 45 video tokens
N_AUDIO, N_TEXT = 12, 16


class Hot(torch.nn.Module):
    """`forward_prepared` with flat tensor inputs (StreamInputs fields, 2.3: none is None)."""

    def __init__(self, dit: D.LTXDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, *t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(D.StreamInputs._fields)
        return self.dit.forward_prepared(*t[:4], D.StreamInputs(*t[4 : 4 + n]), D.StreamInputs(*t[4 + n :]))


def rank_body(rank: int, world_size: int, device: str, where: str) -> dict[str, float]:
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    cfg = tiny_config(ModelVersion.LTX23)
    cfg["transformer"].update(
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        audio_num_attention_heads=4,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=16,
    )
    model = build_random("dit", cfg, seed=11, device=dev).eval()
    sp = SequenceParallelDiT(model)
    gen = torch.Generator().manual_seed(0)
    f, h, w = GRID
    tv = torch.full((1, f * h * w, 1), 0.7)
    tv[:, : h * w] = 0.0
    video, audio = model.prepare(
        video_timesteps=tv.to(dev),
        audio_timesteps=torch.full((1, N_AUDIO, 1), 0.45, device=dev),
        video_sigma=torch.tensor(0.7, device=dev),
        audio_sigma=torch.tensor(0.45, device=dev),
        video_positions=D.video_positions(f, h, w, 24.0, device=dev),
        audio_positions=D.audio_positions(N_AUDIO, device=dev),
        dtype=torch.float32,
    )
    layout = sp.layout(f * h * w)
    latents = (
        layout.take(torch.randn(1, f * h * w, 128, generator=gen), 1),
        torch.randn(1, N_AUDIO, 128, generator=gen),
        torch.randn(1, N_TEXT, 32, generator=gen),
        torch.randn(1, N_TEXT, 16, generator=gen),
    )
    args = tuple(t.to(dev) for t in (*latents, *shard_stream(video, layout), *audio))
    start = time.monotonic()
    with sp.bound(layout), torch.no_grad():
        program = torch.export.export(Hot(model), args)
        package = torch._inductor.aoti_compile_and_package(program, package_path=f"{where}/rank{rank}.pt2")
        built = time.monotonic() - start
        got = torch._inductor.aoti_load_package(package)(*args)
        want = Hot(model)(*args)
    return {
        "compile_s": built,
        "video_max_abs": (got[0] - want[0]).abs().max().item(),
        "audio_max_abs": (got[1] - want[1]).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="fvrt-sp-aoti-") as where:
        results = run_ranks(rank_body, args.world_size, (args.device, where), backend=backend, timeout_s=1800)
    for rank, r in enumerate(results):
        print(f"rank {rank}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))


if __name__ == "__main__":
    main()
