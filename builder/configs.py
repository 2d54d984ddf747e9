"""Model configs in the official checkpoint-metadata format: full size (as released) and tiny (for tests).

Tiny configs are the full configs with sizes shrunk and nothing else changed, so the same code paths (every
branch of the real model) run at both sizes. Both are built by the same `StageSpec.build` functions.

Provenance of the full configs (builder/presets/*.json): the LTX-2.3 22B `config` metadata was copied
verbatim from a third-party loader that embeds the released file's header; the LTX-2 19B transformer section
is the `config.transformer` of `ltx-2-19b-dev.safetensors` quoted in a third-party test. See
../shared/docs/ltx2-architecture.md §0.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

from fvrt.builder.checkpoint import ModelVersion

_PRESET_FILES = {ModelVersion.LTX23: "ltx-2.3-22b.json", ModelVersion.LTX2: "ltx-2-19b.json"}
_UPSAMPLER_FILES = {ModelVersion.LTX23: "upsampler-2.3.json", ModelVersion.LTX2: "upsampler-2.0.json"}


def _preset(name: str) -> dict[str, Any]:
    return json.loads(resources.files("fvrt.builder.presets").joinpath(name).read_text())


def full_config(version: ModelVersion) -> dict[str, Any]:
    """The released checkpoint's `config` metadata for `version`."""
    return _preset(_PRESET_FILES[version])


def upsampler_config(version: ModelVersion, *, tiny: bool = False) -> dict[str, Any]:
    """`config` metadata of the separate latent-upsampler file."""
    cfg = _preset(_UPSAMPLER_FILES[version])
    if tiny:
        cfg.update(TINY_UPSAMPLER)
    return cfg


# --- tiny sizes, per config section. Only sizes: every flag keeps its released value. -------------------------
# Each section is owned by the stage that reads it (dit/text: "transformer"; video VAE: "vae"; audio VAE:
# "audio_vae"; vocoder: "vocoder"; upsampler: TINY_UPSAMPLER).

TINY_TRANSFORMER: dict[str, Any] = {
    # 2 blocks, 2 heads. Video head_dim 8 over 3 RoPE axes leaves a non-zero split-RoPE pad (8 - 3*2 = 2), so
    # the front-padding path runs. Latent channels (128 video, 8x16 audio) keep their released values.
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 16,
    "audio_num_attention_heads": 2,
    "audio_attention_head_dim": 4,
    "audio_cross_attention_dim": 8,
    "connector_num_layers": 2,
    "caption_channels": 32,  # = the tiny Gemma's hidden size (3840 for Gemma-3 12B)
    # LTX-2: the connectors run at the Gemma width (30 x 128 = 3840 released), so 2 x 16 = 32 here.
    "2.0": {"connector_num_attention_heads": 2, "connector_attention_head_dim": 16},
    # LTX-2.3: connectors run at the DiT widths (video 32 x 128, audio 32 x 64 released).
    "2.3": {
        "connector_num_attention_heads": 2,
        "connector_attention_head_dim": 8,
        "audio_connector_num_attention_heads": 2,
        "audio_connector_attention_head_dim": 4,
    },
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    # Gemma-3 text model size; not part of the released metadata (ltx-core hard-codes Gemma-3 12B: 3840 wide,
    # 48 layers), so the tiny config adds this section and the text projection reads it (default: 12B).
    # 4 layers = sliding and global layers alternate in the tiny Gemma (tests/tiny_gemma.py).
    "hidden_size": 32,  # = TINY_TRANSFORMER["caption_channels"]
    "num_hidden_layers": 4,
}
TINY_VAE: dict[str, Any] = {
    # Every block kind of the released lists, in the released order, with 1-2 res layers each. The decoder
    # starts at 8 x 8 = 64 channels (released 1024). The encoder's first width is the latent width in ltx-core
    # (128, kept), so the tiny encoder doubles once (to 256) and then keeps its width with multiplier-1
    # downsamplers instead of growing to 2048 / 1024; the space-to-depth skips then average groups of
    # 2/2/8/8 (2.0) and 4/1/8/8 (2.3) channels.
    "decoder_base_channels": 8,
    "2.0": {
        "encoder_blocks": [
            ["res_x", {"num_layers": 1}],
            ["compress_space_res", {"multiplier": 2}],
            ["res_x", {"num_layers": 1}],
            ["compress_time_res", {"multiplier": 1}],
            ["res_x", {"num_layers": 1}],
            ["compress_all_res", {"multiplier": 1}],
            ["res_x", {"num_layers": 1}],
            ["compress_all_res", {"multiplier": 1}],
            ["res_x", {"num_layers": 2}],
        ],
        # released: res x5 and residual compress_all (multiplier 2) x3
        "decoder_blocks": [
            ["res_x", {"num_layers": 1, "inject_noise": False}],
            ["compress_all", {"residual": True, "multiplier": 2}],
            ["res_x", {"num_layers": 1, "inject_noise": False}],
            ["compress_all", {"residual": True, "multiplier": 2}],
            ["res_x", {"num_layers": 1, "inject_noise": False}],
            ["compress_all", {"residual": True, "multiplier": 2}],
            ["res_x", {"num_layers": 2, "inject_noise": False}],
        ],
    },
    "2.3": {
        "encoder_blocks": [
            ["res_x", {"num_layers": 1}],
            ["compress_space_res", {"multiplier": 1}],
            ["res_x", {"num_layers": 1}],
            ["compress_time_res", {"multiplier": 2}],
            ["res_x", {"num_layers": 1}],
            ["compress_all_res", {"multiplier": 1}],
            ["res_x", {"num_layers": 1}],
            ["compress_all_res", {"multiplier": 1}],
            ["res_x", {"num_layers": 2}],
        ],
        # released multipliers kept (plain, non-residual upsamplers; 64 -> 32 -> 32 -> 16 -> 8 channels)
        "decoder_blocks": [
            ["res_x", {"num_layers": 1}],
            ["compress_space", {"multiplier": 2}],
            ["res_x", {"num_layers": 1}],
            ["compress_time", {"multiplier": 2}],
            ["res_x", {"num_layers": 1}],
            ["compress_all", {"multiplier": 1}],
            ["res_x", {"num_layers": 1}],
            ["compress_all", {"multiplier": 2}],
            ["res_x", {"num_layers": 2}],
        ],
    },
}
TINY_AUDIO_VAE: dict[str, Any] = {
    # Widths 128/128/256 instead of 128/256/512, 2 blocks per level instead of 3. ch stays 128 (it sizes the
    # latent statistics, = 8 x 16 latent bins), 3 levels stay (x4 time/mel), and the width change between the
    # two coarse levels keeps a `nin_shortcut` in the tiny model.
    "model": {"params": {"ddconfig": {"ch_mult": [1, 1, 2], "num_res_blocks": 1}}},
}
TINY_VOCODER: dict[str, Any] = {
    # Channels, and for LTX-2.3 the number of resblock kernels: upsample rates (they set the sample rates), upsample
    # kernels, the three dilations per resblock, SnakeBeta/anti-aliasing, the STFT (n_fft 512, hop 80, 64 mels) keep
    # their released values. LTX-2.3's generators keep two of the released resblock kernels 3/7/11 (BigVGAN: 3 and
    # 11, still averaged) and one (BWE: 7): its audio decoder engine then compiles in 146 s instead of 268 s on the
    # 2-core CPU machine, the largest single cost of the tiny build. LTX-2's HiFi-GAN keeps all three.
    # Channels halve per upsample, so the width must stay >= 2**len(rates): finals here are 2 channels.
    "2.0": {"upsample_initial_channel": 64},  # HiFi-GAN, 5 upsamples (1024 released)
    "2.3": {
        "vocoder": {
            "upsample_initial_channel": 128,
            "resblock_kernel_sizes": [3, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
        },  # BigVGAN, 6 upsamples (1536 released)
        "bwe": {
            "upsample_initial_channel": 64,
            "resblock_kernel_sizes": [7],
            "resblock_dilation_sizes": [[1, 3, 5]],
        },  # BWE generator, 5 upsamples (512 released)
    },
}
TINY_UPSAMPLER: dict[str, Any] = {
    # GroupNorm(32, .) needs a multiple of 32; in_channels stays 128 (the video latent).
    "mid_channels": 64,
    "num_blocks_per_stage": 2,
}


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def tiny_config(version: ModelVersion) -> dict[str, Any]:
    """`full_config(version)` with every size shrunk for CPU tests (seconds, not hours)."""
    cfg = full_config(version)
    for section, override in (
        ("transformer", TINY_TRANSFORMER),
        ("vae", TINY_VAE),
        ("audio_vae", TINY_AUDIO_VAE),
        ("vocoder", TINY_VOCODER),
    ):
        # keys "2.0" / "2.3" hold per-version sizes on top of the shared ones
        _merge(cfg[section], {k: v for k, v in override.items() if k not in ("2.0", "2.3")})
        _merge(cfg[section], override.get(version.value, {}))
    cfg["text_encoder"] = copy.deepcopy(TINY_TEXT_ENCODER)
    return cfg
