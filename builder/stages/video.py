"""The video VAE and the latent upsampler: `video_encoder` (image conditioning, at both pipeline stages'
sizes), `upsampler` (x2 latent upsampling with the latent un-/re-normalisation) and `video_decoder`."""

from __future__ import annotations

import torch
from torch import nn

from fvrt.builder.checkpoint import CheckpointError, LTXCheckpoint
from fvrt.builder.stages.base import Engine, EngineSpec, SpecContext, StageFamily
from fvrt.runtime.shapes import LATENT_CHANNELS

RGB = 3  # image channels of the encoder's input [1, 3, 1, H, W] in [-1, 1]


class UpsamplerEngine(nn.Module):
    """Normalised latent [1, 128, F', H', W'] -> normalised [1, 128, F', 2H', 2W'] (un-normalise, upsample,
    re-normalise with the video VAE's per-channel statistics, as ltx_core `upsample_video`)."""

    def __init__(self, upsampler: nn.Module, mean_of_means: torch.Tensor, std_of_means: torch.Tensor) -> None:
        super().__init__()
        self.upsampler = upsampler
        self.register_buffer("mean_of_means", mean_of_means.detach().clone())
        self.register_buffer("std_of_means", std_of_means.detach().clone())

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        from fvrt.builder.models.upsampler import upsample_video_latent

        return upsample_video_latent(latent, self.upsampler, self.mean_of_means, self.std_of_means)


def latent_statistics(ckpt: LTXCheckpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """The video VAE's per-channel latent statistics (mean-of-means, std-of-means) [128]."""
    vae = ckpt.video_encoder if ckpt.video_encoder is not None else ckpt.video_decoder
    if vae is None:
        raise CheckpointError("the upsampler engine needs the video VAE statistics: load video_encoder or decoder")
    stats = vae.per_channel_statistics
    return getattr(stats, "mean-of-means"), getattr(stats, "std-of-means")


def specs(ctx: SpecContext) -> list[EngineSpec]:
    by_key, full = ctx.stage_keys, ctx.video_keys

    def image(key: str) -> tuple[torch.Tensor]:
        p, stage = by_key[key]
        div = 3 - stage  # stage 1 at half height and width
        return (ctx.rand((1, RGB, 1, p.height // div, p.width // div)).clamp(-1, 1),)

    return [
        EngineSpec("video_encoder", ctx.ckpt.video_encoder, ["image"], ["latent"], list(by_key), image),
        EngineSpec(
            "upsampler",
            UpsamplerEngine(ctx.ckpt.upsampler, *latent_statistics(ctx.ckpt)),
            ["latent"],
            ["latent_up"],
            list(full),
            lambda k: (ctx.rand((1, LATENT_CHANNELS, *full[k].latent(1))),),
        ),
        EngineSpec(
            "video_decoder",
            ctx.ckpt.video_decoder,
            ["latent"],
            ["video"],
            list(full),
            lambda k: (ctx.rand((1, LATENT_CHANNELS, *full[k].latent(2))),),
        ),
    ]


FAMILY = StageFamily(
    "video",
    (
        Engine("video_encoder", ("video_encoder",), conv_layout=True),
        # + the VAE's latent statistics, from the encoder or the decoder
        Engine("upsampler", ("upsampler", "video_encoder", "video_decoder")),
        Engine("video_decoder", ("video_decoder",), conv_layout=True),
    ),
    specs,
)
