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
TINY_VAE: dict[str, Any] = {}
TINY_AUDIO_VAE: dict[str, Any] = {}
TINY_VOCODER: dict[str, Any] = {}
TINY_UPSAMPLER: dict[str, Any] = {}


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
    return cfg
