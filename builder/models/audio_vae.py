# Ported from ltx_core/model/audio_vae/{audio_vae,causal_conv_2d,resnet,upsample,ops,model_configurator}.py and
# ltx_core/model/common/normalization.py (ltx-core 1.0.0)
"""Stage `audio_decoder`: the audio VAE decoder, normalised audio latent -> stereo log-mel spectrogram.

    latent [B, 8, T_a, 16] (normalised)  ->  mel [B, 2, 4*T_a - 3, 64]

The latent is un-normalised with per-channel statistics over the 128-d patchified vector (channel-major:
index c * 16 + f), then decoded by a 2-D conv net over (time, mel) that is causal along time ("height"),
uses PixelNorm (weightless RMS over channels) and SiLU, and has no attention in the released config. Each of
the two upsampling levels doubles time and mel and drops the first time row, so T -> 2T - 1 -> 4T - 3.

Versions: LTX-2 (19B) and LTX-2.3 (22B) use the same architecture and the same ddconfig (ch 128,
ch_mult (1, 2, 4), 2 res blocks per level, z_channels 8, mel_bins 64); only the weights differ. The 19B
`audio_vae` preset section is a copy of the 2.3 one (see builder/presets): diffusers'
`convert_ltx2_to_diffusers.py` gives identical audio-VAE configs for 2.0 and 2.3.

Not implemented (refused at build): attention blocks (`attn_resolutions` hitting a level,
`mid_block_add_attention`), GroupNorm, causality other than "height", channel/mel layouts where the decoder
output would need the official crop/pad (`_adjust_output_shape` is then a no-op and is left out).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvrt.builder.checkpoint import CheckpointError, StageSpec, default_randomize, require

LATENT_DOWNSAMPLE_FACTOR = 4
"""Mel frames per latent frame and mel bins per latent bin (ltx_core audio_vae.py LATENT_DOWNSAMPLE_FACTOR).
The official decoder crops/pads its output to 4*T - 3 frames whatever its depth, so fvrt requires the depth
(3 levels, two x2 upsamplers) that produces exactly that."""

PIXEL_NORM_EPS = 1e-6
"""PixelNorm epsilon (common/normalization.py build_normalization_layer: PixelNorm(dim=1, eps=1e-6))."""

_SECTION = "audio_vae.model.params.ddconfig"


class CausalConv2d(nn.Module):
    """Conv2d over [B, C, T, F] padded causally in time (k-1 rows in front) and symmetrically in mel.

    Parameter names follow the official wrapper (`<name>.conv.weight`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size - 1
        # F.pad order: (mel left, mel right, time front, time back)
        self.padding = (pad // 2, pad - pad // 2, pad, 0)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, T, F] -> [B, C_out, T, F]."""
        if any(self.padding):
            x = F.pad(x, self.padding)
        return self.conv(x)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2 over channels) + eps) for [B, C, T, F] (official PixelNorm, same op order)."""
    return x / torch.sqrt(torch.mean(x * x, dim=1, keepdim=True) + PIXEL_NORM_EPS)


class ResnetBlock(nn.Module):
    """PixelNorm -> SiLU -> conv3 -> PixelNorm -> SiLU -> conv3, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = CausalConv2d(in_channels, out_channels, 3)
        self.conv2 = CausalConv2d(out_channels, out_channels, 3)
        self.nin_shortcut = CausalConv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, T, F] -> [B, C_out, T, F]."""
        h = self.conv1(F.silu(pixel_norm(x)))
        h = self.conv2(F.silu(pixel_norm(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Upsample(nn.Module):
    """Nearest x2 in time and mel, causal conv3, then drop the first time row: [B, C, T, F] -> [B, C, 2T-1, 2F].

    The first two output rows of the causal conv depend only on input row 0; dropping one undoes the encoder's
    causal padding (official upsample.py, CausalityAxis.HEIGHT)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv2d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)[:, :, 1:, :]


class MidBlock(nn.Module):
    """Two ResnetBlocks at the base width (`attn_1` is Identity in the released config and holds no tensors)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class UpLevel(nn.Module):
    """One resolution level: `num_res_blocks + 1` ResnetBlocks, then (except level 0) an Upsample."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(n_blocks)]
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class PerChannelStatistics(nn.Module):
    """Latent statistics over the patchified 128-d vector (buffers named as in the checkpoint)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("std-of-means", torch.empty(channels))
        self.register_buffer("mean-of-means", torch.empty(channels))

    def un_normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, Z, T, Fz] normalised -> raw; statistic index z * Fz + f (official patchify `b c t f -> b t (c f)`)."""
        _, z, _, fz = latent.shape
        std = self.get_buffer("std-of-means").to(latent.dtype).view(1, z, 1, fz)
        mean = self.get_buffer("mean-of-means").to(latent.dtype).view(1, z, 1, fz)
        return latent * std + mean


class AudioDecoder(nn.Module):
    """Audio VAE decoder: normalised latent [B, z, T, mel_bins/4] -> log-mel [B, out_ch, 4T-3, mel_bins].

    Parameter names equal the official `AudioDecoder`'s state_dict (`conv_in.conv.*`, `mid.block_1.*`,
    `up.<level>.block.<i>.*`, `up.<level>.upsample.conv.conv.*`, `conv_out.conv.*`, `per_channel_statistics.*`).
    """

    def __init__(
        self, *, ch: int, out_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, mel_bins: int
    ) -> None:
        super().__init__()
        self.z_channels = z_channels
        self.latent_mel_bins = ch // z_channels  # input [B, z, T, Fz]
        self.mel_bins = mel_bins  # output [B, out_ch, 4T - 3, mel_bins]
        self.per_channel_statistics = PerChannelStatistics(ch)
        base = ch * ch_mult[-1]
        self.conv_in = CausalConv2d(z_channels, base, 3)
        self.mid = MidBlock(base)
        # `up[level]`, level 0 = finest; built coarse to fine as the official `build_upsampling_path` does.
        levels: list[UpLevel] = []
        block_in = base
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            levels.insert(0, UpLevel(block_in, block_out, num_res_blocks + 1, upsample=level != 0))
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.conv_out = CausalConv2d(block_in, out_ch, 3)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, z, T, Fz] (normalised) -> mel [B, out_ch, 4T - 3, 4 * Fz]."""
        h = self.conv_in(self.per_channel_statistics.un_normalize(latent))
        h = self.mid(h)
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
        return self.conv_out(F.silu(pixel_norm(h)))


def _level_resolutions(resolution: int, n_levels: int) -> list[int]:
    """The `curr_res` of each decoder level, coarse to fine (official build_upsampling_path)."""
    base = resolution // (2 ** (n_levels - 1))
    return [base * 2**i for i in range(n_levels)]


def build_audio_decoder(config: Mapping[str, Any]) -> AudioDecoder:
    """AudioDecoder from the checkpoint `config` (section audio_vae.model.params.ddconfig)."""
    audio_vae = require(config, "audio_vae", "config")
    if not isinstance(audio_vae, Mapping):
        raise CheckpointError(f"config 'audio_vae' is not a section: {audio_vae!r}")
    dd = require(require(require(audio_vae, "model", "audio_vae"), "params", "audio_vae.model"), "ddconfig", "params")
    ch = int(require(dd, "ch", _SECTION))
    out_ch = int(require(dd, "out_ch", _SECTION))
    ch_mult = tuple(int(m) for m in require(dd, "ch_mult", _SECTION))
    num_res_blocks = int(require(dd, "num_res_blocks", _SECTION))
    z_channels = int(require(dd, "z_channels", _SECTION))
    mel_bins = int(require(dd, "mel_bins", _SECTION))
    norm_type = require(dd, "norm_type", _SECTION)
    causality = require(dd, "causality_axis", _SECTION)
    mid_attn = require(dd, "mid_block_add_attention", _SECTION)
    attn_res = require(dd, "attn_resolutions", _SECTION)  # official default {8, 16, 32} if absent
    resolution = int(require(dd, "resolution", _SECTION))

    if norm_type != "pixel":
        raise CheckpointError(f"config '{_SECTION}.norm_type' = {norm_type!r} is not supported (fvrt: 'pixel')")
    if causality != "height":
        raise CheckpointError(f"config '{_SECTION}.causality_axis' = {causality!r} is not supported (fvrt: 'height')")
    if mid_attn:
        raise CheckpointError(f"config '{_SECTION}.mid_block_add_attention' = true is not supported (no attention)")
    hit = sorted(set(int(r) for r in attn_res) & set(_level_resolutions(resolution, len(ch_mult))))
    if hit:
        raise CheckpointError(f"config '{_SECTION}.attn_resolutions' puts attention at {hit}; not supported")
    if len(ch_mult) != 3:
        raise CheckpointError(
            f"config '{_SECTION}.ch_mult' = {list(ch_mult)}: fvrt needs 3 levels (x{LATENT_DOWNSAMPLE_FACTOR} time/mel)"
        )
    if ch % z_channels or mel_bins != LATENT_DOWNSAMPLE_FACTOR * (ch // z_channels):
        # The statistics vector has `ch` entries and covers z_channels x latent mel bins (official quirk:
        # PerChannelStatistics(latent_channels=ch)); the decoder output then has exactly mel_bins bins.
        raise CheckpointError(
            f"config '{_SECTION}': ch={ch}, z_channels={z_channels}, mel_bins={mel_bins} do not give a "
            f"[B, {z_channels}, T, {mel_bins // LATENT_DOWNSAMPLE_FACTOR}] latent with {ch} statistics"
        )
    return AudioDecoder(
        ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, mel_bins=mel_bins
    )


def randomize_audio_decoder(module: nn.Module, gen: torch.Generator) -> None:
    """`default_randomize`, then statistics that make un-normalisation visible: mean N(0, 0.5), std
    exp(N(0, 0.3)) (positive). Works on the official module too (same buffer names)."""
    default_randomize(module, gen)
    stats = module.get_submodule("per_channel_statistics")
    with torch.no_grad():
        std = stats.get_buffer("std-of-means")
        mean = stats.get_buffer("mean-of-means")
        std.copy_(torch.exp(0.3 * torch.randn(std.shape, generator=gen, device=gen.device)).to(std.dtype))
        mean.copy_((0.5 * torch.randn(mean.shape, generator=gen, device=gen.device)).to(mean.dtype))


STAGES = (
    StageSpec(
        name="audio_decoder",
        rules=(
            # statistics first: module key -> checkpoint key takes the first matching module prefix, and ""
            # matches everything
            ("audio_vae.per_channel_statistics.", "per_channel_statistics."),
            ("audio_vae.decoder.", ""),
        ),
        build=build_audio_decoder,
        randomize=randomize_audio_decoder,
    ),
)
