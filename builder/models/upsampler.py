# Ported from ltx_core/model/upsampler/{model,model_configurator,res_block,pixel_shuffle,spatial_rational_resampler,
# blur_downsample}.py (ltx-core 1.0.0)
"""Stage `upsampler`: the latent spatial upsampler, raw video latent [B, 128, F, H, W] -> [B, 128, F, sH, sW].

    Conv3d(128 -> mid) -> GroupNorm(32) -> SiLU -> n x ResBlock3d -> spatial upsampler (per frame)
    -> n x ResBlock3d -> Conv3d(mid -> 128)

Spatial upsampler, selected by the file's `config` metadata:
- `rational_resampler: false` (LTX-2.3 `ltx-2.3-spatial-upscaler-x2-*`): `upsampler.0` = Conv2d(mid -> 4 mid, 3)
  + PixelShuffle(2), always x2 (the official model ignores `spatial_scale` here; fvrt requires 2.0).
- `rational_resampler: true` (LTX-2 `ltx-2-spatial-upscaler-x2-1.0`): `upsampler.conv` = Conv2d(mid -> p^2 mid, 3)
  + PixelShuffle(p), then a depthwise blur with the stored 5x5 binomial `upsampler.blur_down.kernel` at stride q,
  for spatial_scale = p/q in {0.75, 1.5, 2.0, 4.0}. At 2.0 the stride is 1 and the blur is skipped, as in the
  official code (the kernel is still a checkpoint tensor).

The model works on *un-normalised* latents; `upsample_video_latent` wraps it with the video VAE's per-channel
statistics (un-normalise -> upsample -> re-normalise), as ltx_core `upsample_video` does for the pipelines.

Provenance of builder/presets/upsampler-{2.3,2.0}.json: the LTX-2.3 x2 file's `config` metadata
({"_class_name": "LatentUpsampler", in 128, mid 1024, 4 blocks, dims 3, spatial x2, rational false}) is quoted
verbatim by several third-party loaders; the LTX-2 19B file is assumed to carry the same keys with
`rational_resampler: true` (the architecture notes and its `upsampler.conv` / `upsampler.blur_down.kernel` keys;
ltx-core's own loader leaves a buffer absent from the file on the meta device, so the kernel must be stored).

Not implemented (refused at build): dims 2, temporal upsampling, both/neither upsampling flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvrt.builder.checkpoint import CheckpointError, StageSpec, check_value, default_randomize, require

GROUP_NORM_GROUPS = 32
"""GroupNorm groups of every norm (official model.py / res_block.py: GroupNorm(32, channels), default eps)."""

BLUR_KERNEL_SIZE = 5
"""Binomial blur size of the rational resampler (official blur_downsample.py BlurDownsample(kernel_size=5))."""

RATIONAL_SCALES: dict[float, tuple[int, int]] = {0.75: (3, 4), 1.5: (3, 2), 2.0: (2, 1), 4.0: (4, 1)}
"""spatial_scale -> (pixel-shuffle factor p, blur stride q) (official spatial_rational_resampler.py)."""

_SECTION = "upsampler config"


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B*F, C, H, W]."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int, f: int) -> torch.Tensor:
    """[B*F, C, H, W] -> [B, C, F, H, W]."""
    _, c, h, w = x.shape
    return x.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


class ResBlock(nn.Module):
    """conv3 -> GN -> SiLU -> conv3 -> GN, + residual, SiLU (3-D convs, [B, C, F, H, W])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(GROUP_NORM_GROUPS, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUP_NORM_GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + x)


class PixelShuffleUpsampler(nn.Sequential):
    """Per frame Conv2d(mid -> 4 mid, 3) + PixelShuffle(2); the conv is `upsampler.0` as in the official
    `nn.Sequential(conv, PixelShuffleND(2))` (channel split `(c p1 p2)`, which is torch's pixel_shuffle order)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, 4 * channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, C, F, 2H, 2W]."""
        b, _, f, _, _ = x.shape
        y = F.pixel_shuffle(self[0](_frames_to_batch(x)), 2)
        return _batch_to_frames(y, b, f)


class BlurDownsample(nn.Module):
    """Depthwise blur with the stored [1, 1, k, k] kernel at stride `stride`, padding k // 2 ([N, C, H, W])."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.register_buffer("kernel", torch.empty(1, 1, BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:  # Python constant: the official module returns its input unchanged
            return x
        c = x.shape[1]
        weight = self.kernel.to(x.dtype).expand(c, 1, BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE)
        return F.conv2d(x, weight, stride=self.stride, padding=BLUR_KERNEL_SIZE // 2, groups=c)


class SpatialRationalResampler(nn.Module):
    """Per frame Conv2d(mid -> p^2 mid, 3) + PixelShuffle(p) + BlurDownsample(q): [B, C, F, H, W] -> x p/q."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.num, self.den = RATIONAL_SCALES[scale]
        self.conv = nn.Conv2d(channels, self.num**2 * channels, 3, padding=1)
        self.blur_down = BlurDownsample(self.den)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, f, _, _ = x.shape
        y = self.blur_down(F.pixel_shuffle(self.conv(_frames_to_batch(x)), self.num))
        return _batch_to_frames(y, b, f)


class LatentUpsampler(nn.Module):
    """Raw (un-normalised) video latent [B, C, F, H, W] -> [B, C, F, H*s, W*s]; names as the official module."""

    def __init__(
        self, *, in_channels: int, mid_channels: int, num_blocks: int, rational: bool, spatial_scale: float
    ) -> None:
        super().__init__()
        self.initial_conv = nn.Conv3d(in_channels, mid_channels, 3, padding=1)
        self.initial_norm = nn.GroupNorm(GROUP_NORM_GROUPS, mid_channels)
        self.res_blocks = nn.ModuleList([ResBlock(mid_channels) for _ in range(num_blocks)])
        self.upsampler: nn.Module = (
            SpatialRationalResampler(mid_channels, spatial_scale) if rational else PixelShuffleUpsampler(mid_channels)
        )
        self.post_upsample_res_blocks = nn.ModuleList([ResBlock(mid_channels) for _ in range(num_blocks)])
        self.final_conv = nn.Conv3d(mid_channels, in_channels, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, C, F, H', W'] (H' = 2H for the released x2 files)."""
        x = F.silu(self.initial_norm(self.initial_conv(latent)))
        for blk in self.res_blocks:
            x = blk(x)
        x = self.upsampler(x)
        for blk in self.post_upsample_res_blocks:
            x = blk(x)
        return self.final_conv(x)


def upsample_video_latent(
    latent: torch.Tensor, upsampler: LatentUpsampler, mean_of_means: torch.Tensor, std_of_means: torch.Tensor
) -> torch.Tensor:
    """Normalised video latent [B, 128, F, H, W] -> normalised [B, 128, F, 2H, 2W] (ltx_core `upsample_video`).

    mean_of_means, std_of_means: [128], the video VAE's `per_channel_statistics` buffers.
    """
    mean = mean_of_means.to(latent.dtype).view(1, -1, 1, 1, 1)
    std = std_of_means.to(latent.dtype).view(1, -1, 1, 1, 1)
    up = upsampler(latent * std + mean)
    return (up - mean) / std


def build_upsampler(config: Mapping[str, Any]) -> LatentUpsampler:
    """LatentUpsampler from the upsampler file's `config` metadata."""
    check_value(config, "_class_name", "LatentUpsampler", _SECTION)
    in_channels = int(require(config, "in_channels", _SECTION))
    mid_channels = int(require(config, "mid_channels", _SECTION))
    num_blocks = int(require(config, "num_blocks_per_stage", _SECTION))
    dims = require(config, "dims", _SECTION)
    spatial = require(config, "spatial_upsample", _SECTION)
    temporal = require(config, "temporal_upsample", _SECTION)
    rational = bool(require(config, "rational_resampler", _SECTION))
    scale = float(require(config, "spatial_scale", _SECTION))
    if dims != 3:
        raise CheckpointError(f"{_SECTION}: dims = {dims!r} is not supported (fvrt implements 3)")
    if spatial is not True or temporal is not False:
        raise CheckpointError(
            f"{_SECTION}: spatial_upsample={spatial!r}, temporal_upsample={temporal!r} is not supported "
            "(fvrt implements spatial-only upsamplers)"
        )
    if rational and scale not in RATIONAL_SCALES:
        raise CheckpointError(f"{_SECTION}: spatial_scale = {scale} is not one of {sorted(RATIONAL_SCALES)}")
    if not rational and scale != 2.0:
        raise CheckpointError(
            f"{_SECTION}: spatial_scale = {scale} without rational_resampler (the official model would upsample x2)"
        )
    if mid_channels % GROUP_NORM_GROUPS:
        raise CheckpointError(f"{_SECTION}: mid_channels = {mid_channels} is not a multiple of {GROUP_NORM_GROUPS}")
    return LatentUpsampler(
        in_channels=in_channels,
        mid_channels=mid_channels,
        num_blocks=num_blocks,
        rational=rational,
        spatial_scale=scale,
    )


def binomial_kernel(size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """The official blur: outer product of binomial row `size - 1`, normalised to sum 1, [1, 1, size, size]."""
    k = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    k2 = torch.outer(k, k)
    return (k2 / k2.sum()).float()[None, None]


def randomize_upsampler(module: nn.Module, gen: torch.Generator) -> None:
    """`default_randomize`, then GroupNorm affine 1 + N(0, 0.1) / N(0, 0.1) (so norm parameters are exercised)
    and the blur kernel set to its fixed binomial value. Works on the official module (same names)."""
    default_randomize(module, gen)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                for p, base in ((m.weight, 1.0), (m.bias, 0.0)):
                    p.copy_((base + 0.1 * torch.randn(p.shape, generator=gen, device=gen.device)).to(p.dtype))
        for name, buf in module.named_buffers():
            if name.endswith("blur_down.kernel"):
                buf.copy_(binomial_kernel(buf.shape[-1]).to(buf))


STAGES = (
    StageSpec(
        name="upsampler", rules=(("", ""),), build=build_upsampler, randomize=randomize_upsampler, file="upsampler"
    ),
)
