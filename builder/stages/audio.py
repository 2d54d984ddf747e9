"""The audio decoder: `audio_decoder` = audio VAE decoder + vocoder, normalised latent -> waveform."""

from __future__ import annotations

import torch
from torch import nn

from fvrt.builder.stages.base import Engine, EngineSpec, SpecContext, StageFamily
from fvrt.runtime.shapes import AUDIO_CHANNELS, AUDIO_MEL_BINS


class AudioDecoderEngine(nn.Module):
    """Normalised audio latent [1, 8, Ta, 16] -> waveform [1, 2, samples] (audio VAE decoder + vocoder)."""

    def __init__(self, decoder: nn.Module, vocoder: nn.Module) -> None:
        super().__init__()
        self.decoder, self.vocoder = decoder, vocoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vocoder(self.decoder(latent))


def specs(ctx: SpecContext) -> list[EngineSpec]:
    full = ctx.video_keys
    return [
        EngineSpec(
            "audio_decoder",
            AudioDecoderEngine(ctx.ckpt.audio_decoder, ctx.ckpt.vocoder),
            ["latent"],
            ["waveform"],
            list(full),
            lambda k: (ctx.rand((1, AUDIO_CHANNELS, full[k].audio_latents, AUDIO_MEL_BINS)),),
        )
    ]


FAMILY = StageFamily("audio", (Engine("audio_decoder", ("audio_decoder", "vocoder")),), specs)
