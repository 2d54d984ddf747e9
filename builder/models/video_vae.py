# Ported from ltx_core/model/video_vae/{video_vae,convolution,resnet,sampling,ops}.py (ltx-core 1.0.0)
"""Video VAE of LTX-2 (19B) and LTX-2.3: stages `video_encoder` and `video_decoder`.

Encoder: video `[B, 3, F, H, W]` in [-1, 1] (F = 8k+1; H, W multiples of 32) -> 4x4 patchify -> causal 3-D
conv stack with space-to-depth downsamplers -> the 128 latent means, normalised per channel with the dataset
statistics -> `[B, 128, 1 + (F-1)/8, H/32, W/32]`. Decoder: the inverse, un-normalising first and upsampling
with depth-to-space blocks, `[B, 128, F', H', W'] -> [B, 3, 8(F'-1)+1, 32H', 32W']`.

Parameter and buffer names equal the official modules' `state_dict()` names. The forward code is ours and is
written for export: static shapes, no data-dependent control flow, channel/space rearranges as view/permute/
reshape. The untiled decode materialises nothing the official one does not (the residual upsampler's channel
repeat is a broadcast here, one full-size tensor fewer than the official `repeat`). Measured on one H100, bf16,
random weights, latent [1, 128, 16, 34, 60] -> 121x1088x1920: peak allocation 28.0 GiB vs official 31.9 (19B)
and 27.9 vs 28.0 (2.3), same time (1.28 s / 1.55 s), identical outputs.

Implemented variants (anything else is refused with CheckpointError): `dims` 3, `norm_layer` "pixel_norm",
`latent_log_var` "uniform", `timestep_conditioning` false, spatial padding "zeros" or "reflect", encoder blocks
`res_x` / `compress_{space,time,all}_res`, decoder blocks `res_x` (no noise injection) / `compress_{space,time,all}`
(residual or not). The decoder's `causal_decoder` flag is honoured (false in both releases).

Config provenance. LTX-2.3: the released metadata (builder/presets/ltx-2.3-22b.json). LTX-2 19B: the `vae`
section of builder/presets/ltx-2-19b.json was *reconstructed*, not copied from the released header (no copy of
it was available): the block lists follow the doc (../shared/docs/ltx2-architecture.md §4: encoder res
(4,6,6,2,2), 128->256->512->1024->2048 via compress_{space,time,all,all}_res x2; decoder 128->1024, res x5,
then 3x residual compress_all (multiplier 2) with res x5 at 512/256/128) written in the LTX-Video metadata format
that the 2.3 header also uses. Two knobs are the least certain:
  * `spatial_padding_mode` is left out, so ltx-core's per-stage defaults apply (encoder "zeros", decoder
    "reflect"), matching the diffusers LTX-2 config (encoder zeros, decoder reflect). If the real header says
    "reflect", the 19B encoder would pad with reflect too.
  * `timestep_conditioning` is false, per diffusers-format LTX-2 VAE configs seen in third-party tests (not
    verified against the safetensors header; ltx-core's own default is true). A checkpoint with timestep
    conditioning is refused here, and it would also carry `vae.decoder.*time_embedder*` tensors that this
    module does not declare, so the strict loader would name them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvrt.builder.checkpoint import CheckpointError, StageSpec, check_value, require

KERNEL = 3
"""Every VAE convolution is 3x3x3 (`kernel_size=3` in every official `make_conv_nd` call of the VAE)."""
PIXEL_NORM_EPS = 1e-8
"""`PixelNorm()` default eps (ltx_core/model/common/normalization.py), used by the VAE's res blocks and heads."""
TEMPORAL_STRIDE_2 = 2
"""Up/down-samplers with temporal stride 2 pad (down) or drop (up) one first frame to keep F = 8k+1 <-> k+1."""

# The official configurators read `spatial_padding_mode` with a different default per stage
# (ltx_core/model/video_vae/model_configurator.py): absent means zeros in the encoder and reflect in the decoder.
# The 19B header is taken to omit the key (see the module docstring), so absence keeps its official meaning.
ENCODER_DEFAULT_PADDING = "zeros"
DECODER_DEFAULT_PADDING = "reflect"
_PADDING_MODES = ("zeros", "reflect")

# Official per-block defaults of the list-format block params (video_vae.py::_make_{encoder,decoder}_block).
ENCODER_DEFAULT_MULTIPLIER = 2  # compress_*_res
DECODER_DEFAULT_MULTIPLIER = 1  # compress_*

_ENCODER_STRIDES: dict[str, tuple[int, int, int]] = {
    "compress_space_res": (1, 2, 2),
    "compress_time_res": (2, 1, 1),
    "compress_all_res": (2, 2, 2),
}
_DECODER_STRIDES: dict[str, tuple[int, int, int]] = {
    "compress_space": (1, 2, 2),
    "compress_time": (2, 1, 1),
    "compress_all": (2, 2, 2),
}


# --------------------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class VaeConfig:
    """The `vae` section of the checkpoint metadata, validated."""

    in_channels: int  # video channels (3)
    out_channels: int  # video channels (3)
    latent_channels: int  # 128
    patch_size: int  # 4: space-to-depth at the input, depth-to-space at the output
    encoder_blocks: tuple[tuple[str, Mapping[str, Any]], ...]
    decoder_blocks: tuple[tuple[str, Mapping[str, Any]], ...]  # in config order (built reversed)
    decoder_base_channels: int  # decoder starts at 8x this
    encoder_padding: str
    decoder_padding: str
    causal_decoder: bool


def _blocks(raw: Any, where: str) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    if not isinstance(raw, list):
        raise CheckpointError(f"config '{where}' is not a list of [name, params] pairs")
    out = []
    for i, item in enumerate(raw):
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise CheckpointError(f"config '{where}[{i}]' is not a [name, params] pair: {item!r}")
        name, params = item
        # official: an int is shorthand for {"num_layers": n}
        params = {"num_layers": params} if isinstance(params, int) else params
        if not isinstance(params, Mapping):
            raise CheckpointError(f"config '{where}[{i}]' params are not a dict: {params!r}")
        out.append((name, dict(params)))
    return tuple(out)


def vae_config(config: Mapping[str, Any]) -> VaeConfig:
    """Read and validate the `vae` section; refuse variants fvrt does not implement."""
    vae = require(config, "vae", "config")
    if not isinstance(vae, Mapping):
        raise CheckpointError(f"config 'vae' section is not a JSON object: {vae!r}")
    w = "vae"
    dims = require(vae, "dims", w)
    if dims != 3:
        raise CheckpointError(f"config 'vae.dims' = {dims!r} is not supported (fvrt implements 3)")
    for key, value in (("norm_layer", "pixel_norm"), ("latent_log_var", "uniform"), ("timestep_conditioning", False)):
        require(vae, key, w)
        check_value(vae, key, value, w)
    # not read by ltx-core 1.0.0; refused anyway if a file asks for a variant
    check_value(vae, "use_quant_conv", False, w)
    check_value(vae, "normalize_latent_channels", False, w)
    check_value(vae, "scaling_factor", 1.0, w)
    enc_pad = vae.get("spatial_padding_mode", ENCODER_DEFAULT_PADDING)
    dec_pad = vae.get("spatial_padding_mode", DECODER_DEFAULT_PADDING)
    if enc_pad not in _PADDING_MODES:
        raise CheckpointError(f"config 'vae.spatial_padding_mode' = {enc_pad!r} is not supported ({_PADDING_MODES})")
    causal = require(vae, "causal_decoder", w)
    if not isinstance(causal, bool):
        raise CheckpointError(f"config 'vae.causal_decoder' = {causal!r} is not a bool")
    cfg = VaeConfig(
        in_channels=int(require(vae, "in_channels", w)),
        out_channels=int(require(vae, "out_channels", w)),
        latent_channels=int(require(vae, "latent_channels", w)),
        patch_size=int(require(vae, "patch_size", w)),
        encoder_blocks=_blocks(require(vae, "encoder_blocks", w), "vae.encoder_blocks"),
        decoder_blocks=_blocks(require(vae, "decoder_blocks", w), "vae.decoder_blocks"),
        decoder_base_channels=int(require(vae, "decoder_base_channels", w)),
        encoder_padding=enc_pad,
        decoder_padding=dec_pad,
        causal_decoder=causal,
    )
    for i, (name, _params) in enumerate(cfg.encoder_blocks):
        if name != "res_x" and name not in _ENCODER_STRIDES:
            raise CheckpointError(f"config 'vae.encoder_blocks[{i}]' block '{name}' is not supported")
    for i, (name, params) in enumerate(cfg.decoder_blocks):
        if name != "res_x" and name not in _DECODER_STRIDES:
            raise CheckpointError(f"config 'vae.decoder_blocks[{i}]' block '{name}' is not supported")
        if params.get("inject_noise", False):
            raise CheckpointError(f"config 'vae.decoder_blocks[{i}].inject_noise' = true is not supported")
    return cfg


# --------------------------------------------------------------------------------------------------------------
# functional pieces


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm over channels, no weight: `[B, C, F, H, W] -> [B, C, F, H, W]`."""
    return x / torch.sqrt(torch.mean(x * x, dim=1, keepdim=True) + PIXEL_NORM_EPS)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """`[B, C, F, H, W] -> [B, C*p*p, F, H/p, W/p]`, channel index c*p*p + (w % p)*p + (h % p) (official
    einops `b c f (h q) (w r) -> b (c r q) f h w`: the W offset is the slower of the two)."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // p, p, w // p, p)  # b c f h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: `[B, C*p*p, F, H, W] -> [B, C, F, H*p, W*p]`."""
    b, cpp, f, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, f, h, w)  # b c r q f h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, f, h * p, w * p)


def space_to_depth(x: torch.Tensor, s: tuple[int, int, int]) -> torch.Tensor:
    """`[B, C, F, H, W] -> [B, C*st*sh*sw, F/st, H/sh, W/sw]`, channel index ((c*st + dt)*sh + dh)*sw + dw
    (einops `b c (d p1) (h p2) (w p3) -> b (c p1 p2 p3) d h w`)."""
    b, c, f, h, w = x.shape
    st, sh, sw = s
    x = x.reshape(b, c, f // st, st, h // sh, sh, w // sw, sw)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * st * sh * sw, f // st, h // sh, w // sw)


def depth_to_space(x: torch.Tensor, s: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `space_to_depth`: `[B, C*st*sh*sw, F, H, W] -> [B, C, F*st, H*sh, W*sw]`."""
    b, cs, f, h, w = x.shape
    st, sh, sw = s
    c = cs // (st * sh * sw)
    x = x.reshape(b, c, st, sh, sw, f, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, f * st, h * sh, w * sw)


# --------------------------------------------------------------------------------------------------------------
# modules


class CausalConv3d(nn.Module):
    """3x3x3 conv, stride 1, with temporal padding by frame replication: causal = the first frame twice in
    front; non-causal = the first frame in front and the last frame behind. Spatial padding 1, zeros or
    reflect. Official name: the weights live in `.conv` (an `nn.Conv3d`)."""

    def __init__(self, in_channels: int, out_channels: int, padding: str) -> None:
        super().__init__()
        if padding not in _PADDING_MODES:
            raise CheckpointError(f"spatial padding mode {padding!r} is not supported ({_PADDING_MODES})")
        self.padding = padding
        self.conv = nn.Conv3d(in_channels, out_channels, KERNEL)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """`[B, Cin, F, H, W] -> [B, Cout, F, H, W]`."""
        return conv3d_same(x, self.conv.weight, self.conv.bias, causal=causal, padding=self.padding)


def conv3d_same(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, causal: bool, padding: str
) -> torch.Tensor:
    """The CausalConv3d computation on explicit weights: `[B, Cin, F, H, W] -> [B, Cout, F, H, W]`."""
    first = x[:, :, :1]
    x = torch.cat((first, first, x), dim=2) if causal else torch.cat((first, x, x[:, :, -1:]), dim=2)
    half = KERNEL // 2
    if padding == "zeros":
        return F.conv3d(x, weight, bias, padding=(0, half, half))
    x = F.pad(x, (half, half, half, half, 0, 0), mode="reflect")
    return F.conv3d(x, weight, bias)


class PerChannelStatistics(nn.Module):
    """Dataset statistics of the 128 latent means. Official buffer names (with hyphens); only these two
    are in the official module (checkpoints also carry unused `channel` / `mean-of-stds`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("std-of-means", torch.empty(channels))
        self.register_buffer("mean-of-means", torch.empty(channels))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.get_buffer("mean-of-means").view(1, -1, 1, 1, 1).to(x)
        std = self.get_buffer("std-of-means").view(1, -1, 1, 1, 1).to(x)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """`(x - mean) / std` per channel of `[B, C, F, H, W]`."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def un_normalize(self, x: torch.Tensor) -> torch.Tensor:
        """`x * std + mean` per channel of `[B, C, F, H, W]`."""
        mean, std = self._stats(x)
        return x * std + mean


class ResnetBlock3D(nn.Module):
    """`x + conv2(silu(norm(conv1(silu(norm(x))))))`, channel count unchanged (the only form the released
    configs use: no shortcut conv, no noise, no timestep AdaLN)."""

    def __init__(self, channels: int, padding: str) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(channels, channels, padding)
        self.conv2 = CausalConv3d(channels, channels, padding)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """`[B, C, F, H, W] -> [B, C, F, H, W]`."""
        # one step per statement, rebinding `h`: each intermediate is freed as soon as the next exists, as in
        # the official forward (a nested call would keep conv1's output alive through conv2)
        h = pixel_norm(x)
        h = F.silu(h)
        h = self.conv1(h, causal)
        h = pixel_norm(h)
        h = F.silu(h)
        h = self.conv2(h, causal)
        return x + h


class UNetMidBlock3D(nn.Module):
    """`res_x`: a chain of `num_layers` res blocks (official name; no attention, no timestep embedder)."""

    def __init__(self, channels: int, num_layers: int, padding: str) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(ResnetBlock3D(channels, padding) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """`[B, C, F, H, W] -> [B, C, F, H, W]`."""
        for block in self.res_blocks:
            x = block(x, causal)
        return x


class SpaceToDepthDownsample(nn.Module):
    """`compress_*_res` (encoder): conv to out/prod(s) channels then space-to-depth, plus a skip that
    space-to-depths the input and averages groups of channels down to `out_channels`. With temporal stride 2
    the first frame is duplicated in front first (F = 2k+1 -> 2k+2 -> k+1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int], padding: str) -> None:
        super().__init__()
        n = math.prod(stride)
        if out_channels % n or (in_channels * n) % out_channels:
            raise CheckpointError(f"space-to-depth {in_channels}->{out_channels} channels with stride {stride}")
        self.stride = stride
        self.group_size = in_channels * n // out_channels
        self.conv = CausalConv3d(in_channels, out_channels // n, padding)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """`[B, Cin, F, H, W] -> [B, Cout, F', H/sh, W/sw]`."""
        if self.stride[0] == TEMPORAL_STRIDE_2:
            x = torch.cat((x[:, :, :1], x), dim=2)
        skip = space_to_depth(x, self.stride)
        b, c, f, h, w = skip.shape
        skip = skip.view(b, c // self.group_size, self.group_size, f, h, w).mean(dim=2)
        return space_to_depth(self.conv(x, causal), self.stride) + skip


class DepthToSpaceUpsample(nn.Module):
    """`compress_*` (decoder): conv to prod(s)*C/multiplier channels then depth-to-space; with temporal stride
    2 the first output frame is dropped (k+1 -> 2k+1). `residual`: plus the depth-to-spaced input repeated
    along channels (tiled: output channel j takes input channel j mod C/prod(s))."""

    def __init__(
        self, in_channels: int, stride: tuple[int, int, int], residual: bool, multiplier: int, padding: str
    ) -> None:
        super().__init__()
        n = math.prod(stride)
        if (n * in_channels) % multiplier or in_channels % n or n % multiplier:
            raise CheckpointError(f"depth-to-space of {in_channels} channels, stride {stride}, multiplier {multiplier}")
        self.stride = stride
        self.residual = residual
        self.repeats = n // multiplier
        self.conv = CausalConv3d(in_channels, n * in_channels // multiplier, padding)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """`[B, C, F, H, W] -> [B, C/multiplier, F*st (- 1 if st = 2), H*sh, W*sw]`."""
        y = depth_to_space(self.conv(x, causal), self.stride)
        if self.residual:
            skip = depth_to_space(x, self.stride)  # [B, C/n, F*st, H*sh, W*sw]
            b, c, f, h, w = y.shape
            y = (y.view(b, self.repeats, c // self.repeats, f, h, w) + skip.unsqueeze(1)).view(b, c, f, h, w)
        if self.stride[0] == TEMPORAL_STRIDE_2:
            y = y[:, :, 1:]
        return y


# --------------------------------------------------------------------------------------------------------------
# encoder / decoder


class VideoEncoder(nn.Module):
    """Stage `video_encoder`: video `[B, 3, F, H, W]` in [-1, 1] -> normalised latent `[B, 128, F', H', W']`,
    F' = 1 + (F-1)/8, H' = H/32, W' = W/32. Always causal in time (as the official encoder)."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.latent_channels = cfg.latent_channels
        pad = self.padding = cfg.encoder_padding
        self.per_channel_statistics = PerChannelStatistics(cfg.latent_channels)
        # official: the encoder's first width is the latent width (its `encoder_base_channels` is not read)
        ch = cfg.latent_channels
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size**2, ch, pad)
        blocks: list[nn.Module] = []
        t, s = 1, cfg.patch_size
        for name, params in cfg.encoder_blocks:
            if name == "res_x":
                blocks.append(UNetMidBlock3D(ch, int(require(params, "num_layers", "vae.encoder_blocks")), pad))
            else:
                stride = _ENCODER_STRIDES[name]
                out = ch * int(params.get("multiplier", ENCODER_DEFAULT_MULTIPLIER))
                blocks.append(SpaceToDepthDownsample(ch, out, stride, pad))
                ch, t, s = out, t * stride[0], s * stride[1]
        self.down_blocks = nn.ModuleList(blocks)
        self.scale = (t, s)
        # uniform log-variance: 128 means + 1 shared log-variance channel; only the means are used
        self.conv_out = CausalConv3d(ch, cfg.latent_channels + 1, pad)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """`[B, 3, F, H, W] -> [B, 128, 1 + (F-1)/t, H/s, W/s]` (t, s = 8, 32 released), normalised."""
        _, _, f, h, w = video.shape
        t, s = self.scale
        if (f - 1) % t or h % s or w % s:
            raise ValueError(
                f"video encoder input {tuple(video.shape)}: frames must be {t}k+1, H and W multiples of {s}"
            )
        x = patchify(video, self.patch_size)
        x = self.conv_in(x, True)
        for block in self.down_blocks:
            x = block(x, True)
        x = pixel_norm(x)
        x = F.silu(x)
        # conv_out restricted to the mean channels (the log-variance channel is discarded by the official code)
        n = self.latent_channels
        x = conv3d_same(
            x, self.conv_out.conv.weight[:n], self.conv_out.conv.bias[:n], causal=True, padding=self.padding
        )
        return self.per_channel_statistics.normalize(x)


class VideoDecoder(nn.Module):
    """Stage `video_decoder`: normalised latent `[B, 128, F', H', W']` -> video `[B, 3, 8(F'-1)+1, 32H', 32W']`
    (roughly in [-1, 1]; not clamped)."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.causal = cfg.causal_decoder
        pad = cfg.decoder_padding
        self.per_channel_statistics = PerChannelStatistics(cfg.latent_channels)
        # official: "3 upsampler blocks with multiplier 2", so the decoder starts at 8x its base width
        ch = cfg.decoder_base_channels * 8
        self.conv_in = CausalConv3d(cfg.latent_channels, ch, pad)
        blocks: list[nn.Module] = []
        for name, params in reversed(cfg.decoder_blocks):
            if name == "res_x":
                blocks.append(UNetMidBlock3D(ch, int(require(params, "num_layers", "vae.decoder_blocks")), pad))
            else:
                mult = int(params.get("multiplier", DECODER_DEFAULT_MULTIPLIER))
                # official: only compress_all reads `residual`; compress_space / compress_time never are
                residual = bool(params.get("residual", False)) if name == "compress_all" else False
                blocks.append(DepthToSpaceUpsample(ch, _DECODER_STRIDES[name], residual, mult, pad))
                ch //= mult
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_out = CausalConv3d(ch, cfg.out_channels * cfg.patch_size**2, pad)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B, 128, F', H', W'] -> [B, 3, F, H, W]`."""
        x = self.per_channel_statistics.un_normalize(latent)
        x = self.conv_in(x, self.causal)
        for block in self.up_blocks:
            x = block(x, self.causal)
        x = pixel_norm(x)
        x = F.silu(x)
        x = self.conv_out(x, self.causal)
        return unpatchify(x, self.patch_size)


# --------------------------------------------------------------------------------------------------------------
# stages


def build_encoder(config: Mapping[str, Any]) -> VideoEncoder:
    """`video_encoder` from the checkpoint's `config` metadata."""
    return VideoEncoder(vae_config(config))


def build_decoder(config: Mapping[str, Any]) -> VideoDecoder:
    """`video_decoder` from the checkpoint's `config` metadata."""
    return VideoDecoder(vae_config(config))


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights that keep activations O(1) through the stack: conv weights N(0, 1/fan_in), biases
    N(0, 0.1^2), latent means N(0, 0.5^2), latent stds exp(N(0, 0.3^2)) (positive). Applies to the official
    modules too (same names)."""

    def randn(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen, device=gen.device) * std).to(t.dtype)

    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(randn(p, 1.0 / math.sqrt(p[0].numel())))
            else:
                p.copy_(randn(p, 0.1))
        for name, b in module.named_buffers():
            if name.endswith("std-of-means"):
                b.copy_(torch.exp(randn(b, 0.3)))
            elif name.endswith("mean-of-means"):
                b.copy_(randn(b, 0.5))
            elif b.is_floating_point():
                b.copy_(1.0 + randn(b, 0.02))


# Checkpoint tensors the official modules do not declare: the statistics file also stores the channel index
# and the mean of the per-channel stds (doc §7), which neither stage uses.
_UNUSED_STATISTICS: tuple[tuple[str, None], ...] = (
    ("vae.per_channel_statistics.channel", None),
    ("vae.per_channel_statistics.mean-of-stds", None),
)

STAGES = (
    StageSpec(
        name="video_encoder",
        rules=(
            ("vae.encoder.", ""),
            *_UNUSED_STATISTICS,
            ("vae.per_channel_statistics.", "per_channel_statistics."),
        ),
        build=build_encoder,
        randomize=randomize,
    ),
    StageSpec(
        name="video_decoder",
        rules=(
            ("vae.decoder.", ""),
            *_UNUSED_STATISTICS,
            ("vae.per_channel_statistics.", "per_channel_statistics."),
        ),
        build=build_decoder,
        randomize=randomize,
    ),
)
