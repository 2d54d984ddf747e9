# Ported from ltx_core/text_encoders/gemma/{feature_extractor.py,embeddings_connector.py,embeddings_processor.py,
# encoders/encoder_configurator.py} (ltx-core 1.0.0)
"""Stage `text_projection`: Gemma hidden states -> the DiT's video and audio text contexts.

`TextProjection(hidden_states [B, T, D, L], attention_mask [B, T]) -> (video [B, T, Cv], audio [B, T, Ca])`
runs the official `EmbeddingsProcessor.process_hidden_states`:

1. Feature extractor, chosen from the config exactly as `_create_feature_extractor` chooses it:
   - V1 (LTX-2, no `caption_proj*` keys): per sample and layer, `8 (x - mean) / (max - min + 1e-6)` over the
     valid tokens x D, flatten to D*L (D-major, layer-minor), zero the padding, one shared
     `aggregate_embed` Linear(D*L -> D, no bias) for video and audio.
   - V2 (LTX-2.3): per token and layer RMS norm over D, flatten, zero the padding, then separate video / audio
     Linear(D*L -> C, bias) applied to `normed * sqrt(C / D)`.
2. Connectors (`Embeddings1DConnector`), one per modality: the 128 learnable registers replace the padding
   (valid tokens moved to the front, registers tiled over the rest, no mask afterwards), pre-norm blocks
   `x += attn1(rms(x))`, `x += ff(rms(x))` with 1-D split RoPE (positions arange(T) / max_pos, theta 1e4,
   float64 frequency grid), optional per-head gate (2.3), final weightless RMS norm.

The official output mask is all ones after the register replacement (and the video output is multiplied by it),
so only the two contexts are returned: the DiT attends to all T context tokens.

Export notes. The register replacement needs no data-dependent shapes: the source of output slot p is the
p-th valid token, found as `#{j : cumsum(mask)[j] <= p}` (a [T, T] comparison summed over j, static shapes),
and fetched with `gather`; slots past the valid count read zeros. The official code then selects with the
*flipped* mask (`flip(m) * compact + (1 - flip(m)) * registers`); that is kept verbatim, so any mask gives the
official result (for left padding flip(m) is simply "slot < number of valid tokens"). The RoPE frequency grid
is a derived buffer (numpy float64, made in `init_constants`); the angles are computed in the forward from
`arange(T)` with torch ops only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fvrt.builder.checkpoint import (
    CheckpointError,
    StageSpec,
    check_value,
    default_randomize,
    require,
)
from fvrt.builder.models.common import Attention, FeedForward, freq_grid, rms_norm

# Gemma-3 12B text model, the encoder every LTX-2 / 2.3 release uses. Its size is not in the checkpoint's
# `config` metadata (ltx-core hard-codes it in `GEMMA3_CONFIG_FOR_LTX`: hidden 3840, 48 layers -> 49 hidden
# states), so an optional `config["text_encoder"]` section overrides it (tiny test configs) and absent means 12B.
GEMMA3_12B_TEXT = {"hidden_size": 3840, "num_hidden_layers": 48}

FE_EPS = 1e-6  # both feature extractors: range / RMS epsilon (`_norm_and_concat_padded_batch`, `..._per_token_rms`)
FE_V1_SCALE = 8.0  # V1 normalisation `8 * (x - mean) / range` (`_norm_and_concat_padded_batch`)
CONNECTOR_REGISTERS = 128  # `Embeddings1DConnector(num_learnable_registers=128)`: the configurators pass no value
CONNECTOR_ROPE_THETA = 10000.0  # `Embeddings1DConnector` default; the configurators pass no theta
# `_create_feature_extractor`: V2 is selected by these keys, and only with exactly these values.
_V2_KEYS = {
    "caption_proj_before_connector": True,
    "caption_projection_first_linear": False,
    "caption_proj_input_norm": False,
    "caption_projection_second_linear": False,
}


def _official_default(section: Mapping[str, Any], key: str, absent: Any) -> Any:
    """A knob whose absence has a meaning in the official configurator (LTX-2 metadata predates it): `absent`
    is ltx-core's own `.get` default, not a guess of ours."""
    return section.get(key, absent)


def text_encoder_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """(Gemma hidden size, number of hidden states = layers + 1) for this checkpoint config."""
    te = config.get("text_encoder", GEMMA3_12B_TEXT)
    hidden = int(require(te, "hidden_size", "text_encoder"))
    layers = int(require(te, "num_hidden_layers", "text_encoder"))
    return hidden, layers + 1


# --------------------------------------------------------------------------------------------------------------
# feature extractors


class FeatureExtractorV1(nn.Module):
    """LTX-2: per-layer masked mean/range norm, one shared `aggregate_embed` Linear(D*L -> D, no bias)."""

    def __init__(self, hidden: int, num_states: int) -> None:
        super().__init__()
        self.aggregate_embed = nn.Linear(hidden * num_states, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: [B, T, D, L]; attention_mask: [B, T] (left padding). Returns (video, audio) features,
        the same tensor twice, [B, T, D].

        Mirrors the official op order and dtype promotion: the mean is divided by a float32 count, so for bf16
        inputs the normalised features are float32 until the cast back before the Linear.
        """
        b, t, d, _ = hidden_states.shape
        dtype = hidden_states.dtype
        lengths = attention_mask.sum(dim=-1)  # [B]
        # the official V1 path rebuilds the mask from the lengths, assuming left padding
        valid = torch.arange(t, device=hidden_states.device)[None, :] >= (t - lengths[:, None])
        valid4 = valid[:, :, None, None]
        masked = hidden_states.masked_fill(~valid4, 0.0)
        mean = masked.sum(dim=(1, 2), keepdim=True) / ((lengths * d).view(b, 1, 1, 1) + FE_EPS)
        x_min = hidden_states.masked_fill(~valid4, float("inf")).amin(dim=(1, 2), keepdim=True)
        x_max = hidden_states.masked_fill(~valid4, float("-inf")).amax(dim=(1, 2), keepdim=True)
        normed = FE_V1_SCALE * (hidden_states - mean) / (x_max - x_min + FE_EPS)
        normed = normed.reshape(b, t, -1).masked_fill(~valid[:, :, None], 0.0)
        features = self.aggregate_embed(normed.to(dtype))
        return features, features


class FeatureExtractorV2(nn.Module):
    """LTX-2.3: per-token RMS norm, separate video / audio Linear(D*L -> C, bias) on `normed * sqrt(C / D)`."""

    def __init__(self, hidden: int, num_states: int, video_dim: int, audio_dim: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.video_aggregate_embed = nn.Linear(hidden * num_states, video_dim, bias=True)
        self.audio_aggregate_embed = nn.Linear(hidden * num_states, audio_dim, bias=True)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: [B, T, D, L]; attention_mask: [B, T]. Returns (video [B, T, Cv], audio [B, T, Ca])."""
        b, t, _, _ = hidden_states.shape
        variance = torch.mean(hidden_states**2, dim=2, keepdim=True)  # [B, T, 1, L]
        normed = (hidden_states * torch.rsqrt(variance + FE_EPS)).reshape(b, t, -1)
        normed = torch.where(attention_mask.bool()[:, :, None], normed, torch.zeros_like(normed))
        normed = normed.to(hidden_states.dtype)
        v_dim, a_dim = self.video_aggregate_embed.out_features, self.audio_aggregate_embed.out_features
        video = self.video_aggregate_embed(normed * math.sqrt(v_dim / self.hidden))
        audio = self.audio_aggregate_embed(normed * math.sqrt(a_dim / self.hidden))
        return video, audio


# --------------------------------------------------------------------------------------------------------------
# connectors


class ConnectorBlock(nn.Module):
    """Pre-norm block `x += attn1(rms(x)); x += ff(rms(x))` (official `_BasicTransformerBlock1D`)."""

    def __init__(self, dim: int, heads: int, dim_head: int, gated: bool) -> None:
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head, gated=gated)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [B, T, dim]; pe: (cos, sin) [1, H, T, dim_head / 2]. Returns [B, T, dim]."""
        x = x + self.attn1(rms_norm(x), pe=pe)
        return x + self.ff(rms_norm(x))


class Connector(nn.Module):
    """`Embeddings1DConnector`: registers replace the padding, then RoPE transformer blocks and a final RMS norm."""

    def __init__(self, heads: int, dim_head: int, num_layers: int, max_pos: list[int], gated: bool) -> None:
        super().__init__()
        self.heads, self.dim = heads, heads * dim_head
        self.max_pos = list(max_pos)
        self.transformer_1d_blocks = nn.ModuleList(
            ConnectorBlock(self.dim, heads, dim_head, gated) for _ in range(num_layers)
        )
        self.learnable_registers = nn.Parameter(torch.empty(CONNECTOR_REGISTERS, self.dim))
        self.register_buffer("rope_freqs", torch.empty(self.dim // 2), persistent=False)

    def init_constants(self) -> None:
        """RoPE frequency grid, float64 numpy rounded once to float32 (official `generate_freq_grid_np`)."""
        freqs = freq_grid(CONNECTOR_ROPE_THETA, len(self.max_pos), self.dim)
        self.rope_freqs = freqs.to(self.learnable_registers.device)

    def _rope(self, t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Split-RoPE (cos, sin) [1, H, T, D/2] for positions arange(T) on the single axis (`precompute_freqs_cis`
        with a [1, 1, T] float32 grid; one axis, so the frequency list needs no padding)."""
        frac = torch.arange(t, dtype=torch.float32, device=device) / self.max_pos[0]  # [T]
        angles = self.rope_freqs * (frac[:, None] * 2 - 1)  # [T, D/2]
        cos = angles.cos().reshape(1, t, self.heads, -1).transpose(1, 2)
        sin = angles.sin().reshape(1, t, self.heads, -1).transpose(1, 2)
        return cos.to(dtype), sin.to(dtype)

    def replace_padding(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Valid tokens to the front, registers elsewhere (official `_replace_padded_with_learnable_registers`).

        x: [B, T, C]; attention_mask: [B, T] (1 = valid). T must be a multiple of the 128 registers.
        Slot p takes the p-th valid token: source index `#{j : cumsum(m)[j] <= p}` (static [T, T] compare).
        """
        b, t, c = x.shape
        if t % CONNECTOR_REGISTERS:
            raise ValueError(f"text length {t} is not a multiple of the {CONNECTOR_REGISTERS} connector registers")
        m = attention_mask.to(torch.int64)
        slots = torch.arange(t, device=x.device)
        count = m.cumsum(dim=-1)  # [B, T] valid tokens up to and including j
        src = (count[:, None, :] <= slots[None, :, None]).sum(dim=-1)  # [B, T]: index of the (p+1)-th valid token
        filled = slots[None, :] < count[:, -1:]  # slot p < number of valid tokens
        compact = torch.gather(x, 1, src.clamp(max=t - 1)[:, :, None].expand(b, t, c))
        compact = torch.where(filled[:, :, None], compact, torch.zeros_like(compact))
        registers = self.learnable_registers.to(x.dtype).repeat(t // CONNECTOR_REGISTERS, 1)  # [T, C]
        keep = torch.flip(m, dims=[1]).bool()[:, :, None]  # official: flipped mask selects the compacted tokens
        return torch.where(keep, compact, registers[None])

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, T, C] features; attention_mask: [B, T]. Returns [B, T, C] (no mask: registers fill the padding)."""
        x = self.replace_padding(x, attention_mask)
        pe = self._rope(x.shape[1], x.device, x.dtype)
        for block in self.transformer_1d_blocks:
            x = block(x, pe)
        return rms_norm(x)


# --------------------------------------------------------------------------------------------------------------
# the stage


class TextProjection(nn.Module):
    """Feature extractor + video/audio connectors (official `EmbeddingsProcessor`, same parameter names)."""

    def __init__(self, feature_extractor: nn.Module, video_connector: Connector, audio_connector: Connector) -> None:
        super().__init__()
        self.feature_extractor = feature_extractor
        self.video_connector = video_connector
        self.audio_connector = audio_connector

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: [B, T, D, L] (all Gemma hidden states, stacked on the last dim); attention_mask: [B, T]
        int (1 = real token, left padding). Returns (video context [B, T, Cv], audio context [B, T, Ca])."""
        video, audio = self.feature_extractor(hidden_states, attention_mask)
        return self.video_connector(video, attention_mask), self.audio_connector(audio, attention_mask)


def _connector(tr: Mapping[str, Any], prefix: str, gated: bool) -> Connector:
    """Official `(Audio)Embeddings1DConnectorConfigurator`: audio sizes fall back to the video connector's."""
    heads = require(tr, "connector_num_attention_heads", "transformer")
    dim_head = require(tr, "connector_attention_head_dim", "transformer")
    layers = require(tr, "connector_num_layers", "transformer")
    if prefix:
        heads = _official_default(tr, f"{prefix}connector_num_attention_heads", heads)
        dim_head = _official_default(tr, f"{prefix}connector_attention_head_dim", dim_head)
        layers = _official_default(tr, f"{prefix}connector_num_layers", layers)
    max_pos = require(tr, "connector_positional_embedding_max_pos", "transformer")
    if len(max_pos) != 1:
        raise CheckpointError(f"config 'transformer.connector_positional_embedding_max_pos' = {max_pos}: need 1 axis")
    return Connector(int(heads), int(dim_head), int(layers), [int(v) for v in max_pos], gated)


def build_text_projection(config: Mapping[str, Any]) -> TextProjection:
    """`EmbeddingsProcessorConfigurator.from_config` plus strict checks of the knobs the official code ignores."""
    tr = config["transformer"]
    if require(tr, "rope_type", "transformer") != "split":
        raise CheckpointError("config 'transformer.rope_type' must be 'split'")
    if require(tr, "frequencies_precision", "transformer") != "float64":
        raise CheckpointError("config 'transformer.frequencies_precision' must be 'float64' (float32 grid unsupported)")
    check_value(tr, "connector_num_learnable_registers", CONNECTOR_REGISTERS, "transformer")
    check_value(tr, "connector_norm_output", True, "transformer")
    gated = bool(_official_default(tr, "connector_apply_gated_attention", False))
    video_connector = _connector(tr, "", gated)
    audio_connector = _connector(tr, "audio_", gated)
    hidden, num_states = text_encoder_size(config)

    present = tr.keys() & _V2_KEYS.keys()
    if not present:  # V1 (LTX-2): the projection to the DiT width lives in the DiT (caption_projection)
        fe: nn.Module = FeatureExtractorV1(hidden, num_states)
        widths = {"video": hidden, "audio": hidden}
    else:
        missing = sorted(_V2_KEYS.keys() - present)
        if missing:
            raise CheckpointError(f"config 'transformer' has a partial V2 text projection: missing {missing}")
        for key, value in _V2_KEYS.items():
            check_value(tr, key, value, "transformer")
        check_value(tr, "text_encoder_norm_type", "per_token_rms", "transformer")
        video_dim = require(tr, "num_attention_heads", "transformer") * require(tr, "attention_head_dim", "transformer")
        audio_dim = require(tr, "audio_num_attention_heads", "transformer") * require(
            tr, "audio_attention_head_dim", "transformer"
        )
        fe = FeatureExtractorV2(hidden, num_states, video_dim, audio_dim)
        widths = {"video": video_dim, "audio": audio_dim}
    for name, conn in (("video", video_connector), ("audio", audio_connector)):
        if conn.dim != widths[name]:
            raise CheckpointError(
                f"{name} connector width {conn.dim} != its feature width {widths[name]} (check the connector "
                "heads x head_dim and the text_encoder hidden_size in the config)"
            )
    return TextProjection(fe, video_connector, audio_connector)


def randomize_text_projection(module: nn.Module, gen: torch.Generator) -> None:
    """Default init, then registers U(-1, 1) (the official init's range) and RMSNorm weights 1 + N(0, 0.1) so
    that parity tests see non-trivial norm weights."""
    default_randomize(module, gen)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.RMSNorm):
                m.weight.add_(torch.randn(m.weight.shape, generator=gen, device=gen.device).to(m.weight.dtype) * 0.1)
            reg = getattr(m, "learnable_registers", None)
            if isinstance(reg, nn.Parameter):
                reg.copy_((torch.rand(reg.shape, generator=gen, device=gen.device) * 2 - 1).to(reg.dtype))


STAGES = (
    StageSpec(
        "text_projection",
        rules=(
            ("text_embedding_projection.", "feature_extractor."),
            ("model.diffusion_model.video_embeddings_connector.", "video_connector."),
            ("model.diffusion_model.audio_embeddings_connector.", "audio_connector."),
        ),
        build=build_text_projection,
        randomize=randomize_text_projection,
    ),
)
