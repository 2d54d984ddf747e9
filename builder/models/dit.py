# Ported from ltx_core/model/transformer/{model,transformer,adaln,timestep_embedding,text_projection,
# transformer_args,model_configurator}.py, ltx_core/tools.py and ltx_core/components/patchifiers.py (ltx-core 1.0.0)
"""Stage `dit`: the 48-block audio-video diffusion transformer (velocity prediction), LTX-2 and LTX-2.3.

    video tokens [B, Nv, 128], audio tokens [B, Na, 128], text contexts [B, Nt, dv] / [B, Nt, da]
        -> video velocity [B, Nv, 128], audio velocity [B, Na, 128]

The work is split for export:

(a) Preparation, outside the hot graph (`LTXDiT.prepare`, `LTXDiT.prepare_context`):
    - split-RoPE cos/sin tables for video self-attention, audio self-attention and the two A<->V
      cross-attentions (time axis only), from positions (fps is already folded into the positions);
    - AdaLN-single modulation per *unique* timestep: a token's timestep is `denoise_mask * sigma`, which in the
      pipelines takes one or two values (0 for conditioning tokens, sigma otherwise), so the adaln MLP runs on
      `[B, K]` values and each token carries an index into them; the per-token `[B, T, 9 * d]` tensor of the
      official code is never built. The embedded timestep for the output head is kept the same way;
    - the cross-modal AdaLN (from the *other* modality's sigma) and the 2.3 prompt AdaLN, per batch;
    - the 19B in-DiT caption projection (sigma-independent, so once per prompt).
(b) The hot forward (`LTXDiT.forward_prepared`): patchify projections, the blocks, the output heads. Every
    block is an `AVTransformerBlock` with the same structure, so one compiled block can be applied to each
    layer's weights in turn; no data-dependent control flow.

`LTXDiT.forward` chains both with the semantics of the official `LTXModel.forward` (no perturbations, no
masks), and `video_positions` / `audio_positions` build positions exactly as ltx-core's
`VideoLatentTools` / `AudioLatentTools` do (video positions are cast to the latent dtype: bf16 in the
official pipelines, which rounds the time coordinates).

Not implemented: STG perturbations (`BatchedPerturbationConfig` with entries), text-context and
self-attention masks (the pipelines pass none), video-only / audio-only models, interleaved RoPE and the
float32 frequency grid (configs selecting them are refused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fvrt.builder.checkpoint import (
    CheckpointError,
    ModelVersion,
    StageSpec,
    build_random,
    check_value,
    require,
)
from fvrt.builder.models.common import Attention, FeedForward, RopeTables, rms_norm, rope_tables
from fvrt.runtime import shapes

# --------------------------------------------------------------------------------------------------------------
# constants

LATENT_CHANNELS = shapes.LATENT_CHANNELS
"""Token width of both modalities: 128 video latent channels (patch 1x1x1), 8 audio channels x 16 mel bins
(`audio_in_channels` is absent from the released configs; the official configurator defaults it to 128)."""

TIMESTEP_PROJ_DIM = 256
"""Sinusoidal timestep features (adaln.py PixArtAlphaCombinedTimestepSizeEmbeddings: Timesteps(num_channels=256,
flip_sin_to_cos=True, downscale_freq_shift=0), max_period 10000)."""
TIMESTEP_MAX_PERIOD = 10000

ADALN_BASE_ROWS = 6
"""AdaLN rows per block: shift/scale/gate for self-attention and FFN (adaln.py ADALN_NUM_BASE_PARAMS)."""
ADALN_CROSS_ATTN_ROWS = 3
"""Extra rows with cross-attention AdaLN (2.3): shift/scale/gate of the text cross-attention query."""
AV_SCALE_SHIFT_ROWS = 4
"""A<->V AdaLN rows: scale/shift for a2v, scale/shift for v2a (model.py _init_audio_video(4)); + 1 gate row."""
SELF_ATTN_ROWS, FFN_ROWS, TEXT_CA_ROWS = 0, 3, 6
"""First of the (shift, scale, gate) rows of each modulated sub-layer in a block's AdaLN table
(transformer.py: slice(0, 3), slice(3, 6), slice(6, 9))."""
PROMPT_ADALN_ROWS = 2
"""2.3 prompt AdaLN: shift/scale of the text context (model.py prompt_adaln_single, embedding_coefficient=2)."""
FFN_MULT = 4
"""Feed-forward expansion (feed_forward.py FeedForward(mult=4))."""

VIDEO_SCALE_FACTORS = (shapes.VIDEO_TIME_STRIDE, shapes.VIDEO_SPACE_STRIDE, shapes.VIDEO_SPACE_STRIDE)
"""Pixels per latent voxel along (time, height, width) (types.py SpatioTemporalScaleFactors.default())."""
AUDIO_SAMPLE_RATE = 16000
AUDIO_HOP_LENGTH = 160
AUDIO_LATENT_DOWNSAMPLE = 4
"""Audio timing of the pipelines' `AudioPatchifier(patch_size=1)` (patchifiers.py defaults: 16 kHz, hop 160,
4 mel frames per latent frame, causal)."""

# Config keys the official configurator pins with check_config_value (model_configurator.py), plus the
# variants fvrt does not implement.
_PINNED: dict[str, Any] = {
    "dropout": 0.0,
    "attention_bias": True,
    "num_vector_embeds": None,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "cross_attention_norm": True,
    "double_self_attention": False,
    "upcast_attention": False,
    "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False,
    "qk_norm": "rms_norm",
    "positional_embedding_type": "rope",
    "use_audio_video_cross_attention": True,
    "share_ff": False,
    "av_cross_ada_norm": True,
    "use_middle_indices_grid": True,
    "audio_in_channels": LATENT_CHANNELS,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "audio_out_channels": LATENT_CHANNELS,
    "causal_temporal_positioning": True,
}
_SECTION = "transformer"


# --------------------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class DiTConfig:
    """The sizes and switches of one DiT, read strictly from the checkpoint's `config["transformer"]`."""

    num_layers: int
    heads: int  # video
    head_dim: int
    audio_heads: int
    audio_head_dim: int
    caption_channels: int | None  # 19B: in-DiT caption projection input width; None for 2.3
    gated_attention: bool  # 2.3: per-head gates on every attention
    cross_attention_adaln: bool  # 2.3: AdaLN on the text cross-attention + prompt AdaLN
    norm_eps: float
    theta: float
    max_pos: tuple[int, ...]  # video RoPE normalisers (t, y, x)
    audio_max_pos: tuple[int, ...]
    timestep_scale: float  # sigma -> adaln input (1000)
    av_timestep_scale: float  # sigma -> A<->V gate adaln input (1000)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def audio_dim(self) -> int:
        return self.audio_heads * self.audio_head_dim

    @property
    def adaln_rows(self) -> int:
        return ADALN_BASE_ROWS + (ADALN_CROSS_ATTN_ROWS if self.cross_attention_adaln else 0)

    @property
    def cross_max_pos(self) -> int:
        """A<->V RoPE time normaliser (model.py: max of both modalities' time max_pos)."""
        return max(self.max_pos[0], self.audio_max_pos[0])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiTConfig:
        version = ModelVersion.from_config(config)
        tr = require(config, _SECTION, "config")
        for key, value in _PINNED.items():
            check_value(tr, key, value, _SECTION)
        rope_type = require(tr, "rope_type", _SECTION)  # official default "interleaved" when absent
        if rope_type != "split":
            raise CheckpointError(f"config '{_SECTION}.rope_type' = {rope_type!r} is not supported (fvrt: 'split')")
        precision = require(tr, "frequencies_precision", _SECTION)
        if precision != "float64":
            raise CheckpointError(
                f"config '{_SECTION}.frequencies_precision' = {precision!r} is not supported (fvrt: 'float64')"
            )
        v23 = version is ModelVersion.LTX23
        # `apply_gated_attention` is absent from the 19B metadata; the official configurator reads absent as False.
        gated = bool(tr.get("apply_gated_attention", False))
        cfg = cls(
            num_layers=int(require(tr, "num_layers", _SECTION)),
            heads=int(require(tr, "num_attention_heads", _SECTION)),
            head_dim=int(require(tr, "attention_head_dim", _SECTION)),
            audio_heads=int(require(tr, "audio_num_attention_heads", _SECTION)),
            audio_head_dim=int(require(tr, "audio_attention_head_dim", _SECTION)),
            caption_channels=None if v23 else int(require(tr, "caption_channels", _SECTION)),
            gated_attention=gated,
            cross_attention_adaln=bool(require(tr, "cross_attention_adaln", _SECTION)) if v23 else False,
            norm_eps=float(require(tr, "norm_eps", _SECTION)),
            theta=float(require(tr, "positional_embedding_theta", _SECTION)),
            max_pos=tuple(int(p) for p in require(tr, "positional_embedding_max_pos", _SECTION)),
            audio_max_pos=tuple(int(p) for p in require(tr, "audio_positional_embedding_max_pos", _SECTION)),
            timestep_scale=float(require(tr, "timestep_scale_multiplier", _SECTION)),
            av_timestep_scale=float(require(tr, "av_ca_timestep_scale_multiplier", _SECTION)),
        )
        # Widths the official code only gets right when they agree (contexts are viewed at the stream width;
        # the A<->V RoPE is built with `audio_cross_attention_dim` and each modality's own head count, while
        # the A<->V attentions use the audio heads).
        for key, want in (("cross_attention_dim", cfg.dim), ("audio_cross_attention_dim", cfg.audio_dim)):
            got = int(require(tr, key, _SECTION))
            if got != want:
                raise CheckpointError(f"config '{_SECTION}.{key}' = {got} must equal the stream width {want}")
        if cfg.heads != cfg.audio_heads:
            raise CheckpointError(
                f"config '{_SECTION}': num_attention_heads {cfg.heads} != audio_num_attention_heads "
                f"{cfg.audio_heads} (the A<->V RoPE layout needs equal head counts)"
            )
        if len(cfg.max_pos) != 3 or len(cfg.audio_max_pos) != 1:
            raise CheckpointError(f"config '{_SECTION}': RoPE max_pos must have 3 (video) and 1 (audio) entries")
        return cfg


# --------------------------------------------------------------------------------------------------------------
# positions (ltx_core/tools.py VideoLatentTools / AudioLatentTools, components/patchifiers.py)


def video_positions(
    frames: int,
    height: int,
    width: int,
    fps: float,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Video token positions as `VideoLatentTools(VideoLatentPatchifier(1), shape, fps).create_initial_state`
    builds them: [B, 3, F*H*W, 2] (start, end) per axis (time, y, x) in pixel units, tokens in (f, h, w) order.

    Time gets the causal fix (latent frame 0 -> [0, 1), frame k >= 1 -> [8k - 7, 8k + 1)) and is divided by
    fps (seconds). The result is cast to `dtype`, as the official code casts to the latent dtype: pass the
    latent dtype (bf16 in the official pipelines) for bit parity.
    """
    f, h, w = (torch.arange(n, device=device) for n in (frames, height, width))
    start = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=0).reshape(3, -1)  # int64 [3, T]
    coords = torch.stack([start, start + 1], dim=-1)  # [3, T, 2] latent [start, end)
    scale = torch.tensor(VIDEO_SCALE_FACTORS, device=coords.device).view(3, 1, 1)
    pixel = coords * scale
    t = (pixel[0] + 1 - VIDEO_SCALE_FACTORS[0]).clamp(min=0)  # causal fix: first latent frame covers 1 frame
    pos = torch.stack([t.float() / fps, pixel[1].float(), pixel[2].float()], dim=0)
    return pos.unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)


def audio_positions(frames: int, *, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Audio token positions as `AudioLatentTools(AudioPatchifier(1), shape).create_initial_state` builds
    them: [B, 1, T, 2] (start, end) in seconds, float32 (the official code does not cast them): latent frame i
    starts at mel frame max(4i - 3, 0), 10 ms per mel frame."""

    def seconds(first: int) -> torch.Tensor:
        latent = torch.arange(first, first + frames, dtype=torch.float32, device=device)
        mel = (latent * AUDIO_LATENT_DOWNSAMPLE + 1 - AUDIO_LATENT_DOWNSAMPLE).clip(min=0)
        return mel * AUDIO_HOP_LENGTH / AUDIO_SAMPLE_RATE

    pos = torch.stack([seconds(0), seconds(1)], dim=-1)  # [T, 2]
    return pos.view(1, 1, frames, 2).expand(batch, -1, -1, -1)


def patchify_video(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> tokens [B, F*H*W, C] (VideoLatentPatchifier(patch_size=1))."""
    return latent.flatten(2).transpose(1, 2)


def unpatchify_video(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Tokens [B, F*H*W, C] -> [B, C, F, H, W]."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, frames, height, width)


def patchify_audio(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, T, M] -> tokens [B, T, C*M], channel-major (AudioPatchifier)."""
    return latent.permute(0, 2, 1, 3).flatten(2)


def unpatchify_audio(tokens: torch.Tensor, channels: int) -> torch.Tensor:
    """Tokens [B, T, C*M] -> [B, C, T, M]."""
    b, t, _ = tokens.shape
    return tokens.view(b, t, channels, -1).permute(0, 2, 1, 3)


def unique_timesteps(timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token timesteps [B, T] (or [B, T, 1]) -> (values [B, K], index [B, T] int64) with
    `values.gather(1, index) == timesteps`. K is the number of distinct values over the whole batch (1 or 2 in
    the pipelines: sigma, and 0 for conditioning tokens). Data-dependent: call outside the exported graph."""
    t = timesteps.reshape(timesteps.shape[0], -1)
    values, index = torch.unique(t, sorted=True, return_inverse=True)
    return values.unsqueeze(0).expand(t.shape[0], -1), index


# --------------------------------------------------------------------------------------------------------------
# AdaLN-single (adaln.py, timestep_embedding.py)


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features [N] -> [N, 256] float32, ordered [cos, sin] (flip_sin_to_cos, shift 0)."""
    half = TIMESTEP_PROJ_DIM // 2
    exponent = -math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """`Linear(256, d) -> SiLU -> Linear(d, d)` (official `TimestepEmbedding`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_PROJ_DIM, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimestepEmbedding(nn.Module):
    """Holder of `timestep_embedder` (official `PixArtAlphaCombinedTimestepSizeEmbeddings`, no size embedding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class AdaLayerNormSingle(nn.Module):
    """AdaLN-single (PixArt-alpha): scaled timestep -> (modulation [N, rows * d], embedded timestep [N, d])."""

    def __init__(self, dim: int, rows: int) -> None:
        super().__init__()
        self.emb = _TimestepEmbedding(dim)
        self.linear = nn.Linear(dim, rows * dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [N] already multiplied by the timestep scale; `dtype` is the latent dtype the features are cast
        to (the official `hidden_dtype`)."""
        embedded = self.emb.timestep_embedder(timestep_features(t).to(dtype))
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """19B in-DiT caption projection `Linear -> GELU(tanh) -> Linear` (text_projection.py)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


# --------------------------------------------------------------------------------------------------------------
# prepared inputs


class StreamInputs(NamedTuple):
    """Everything one modality's blocks and output head need besides the token states, prepared outside the
    hot graph and shared by all blocks (each block adds its own scale-shift tables). d: the stream width.

    No field name may be a prefix of another: torch 2.13's `ExportedProgram.module()` emits broken guard code
    for NamedTuple inputs with such fields (e.g. `ada` / `ada_index`)."""

    adaln: torch.Tensor  # [B, K, rows * d]: adaln_single(scale * t_k) for the K unique timesteps
    timestep_index: torch.Tensor  # [B, T] int64: token -> k
    embedded: torch.Tensor  # [B, K, d]: embedded timestep (output head)
    cross_scale_shift: torch.Tensor  # [B, 1, 4 * d]: A<->V scale/shift AdaLN of the OTHER modality's sigma
    cross_gate: torch.Tensor  # [B, 1, d]: A<->V output gate AdaLN of the other modality's sigma
    prompt: torch.Tensor | None  # [B, 1, 2 * d]: 2.3 prompt AdaLN of this modality's sigma; None for 19B
    pe_cos: torch.Tensor  # [B, H, T, D/2] self-attention RoPE
    pe_sin: torch.Tensor
    cross_pe_cos: torch.Tensor  # [B, H, T, Dc/2] A<->V RoPE (time only)
    cross_pe_sin: torch.Tensor

    @classmethod
    def field_names(cls, has_prompt: bool) -> tuple[str, ...]:
        """The fields a model with (`cfg.cross_attention_adaln`, LTX-2.3) or without a prompt AdaLN fills."""
        return tuple(n for n in cls._fields if has_prompt or n != "prompt")

    @classmethod
    def from_fields(cls, tensors: Sequence[torch.Tensor], has_prompt: bool) -> StreamInputs:
        """The inverse of taking `field_names(has_prompt)` in order: `prompt` is None without a prompt AdaLN."""
        t: list[torch.Tensor | None] = list(tensors)
        if not has_prompt:
            t.insert(cls._fields.index("prompt"), None)
        return cls(*t)


def _token_rows(table: torch.Tensor, adaln: torch.Tensor, index: torch.Tensor, row: int) -> torch.Tensor:
    """Row `row` of `table[None, None] + adaln.view(B, K, rows, d)`, gathered per token: [B, T, d].

    The official code adds the table to a per-token [B, T, rows, d] tensor; adding on the K unique values and
    gathering gives the same numbers."""
    b, k, _ = adaln.shape
    d = table.shape[-1]
    values = table[row] + adaln.view(b, k, -1, d)[:, :, row]  # [B, K, d]
    return torch.gather(values, 1, index.unsqueeze(-1).expand(-1, -1, d))


def _token_modulation(
    table: torch.Tensor, s: StreamInputs, first: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, scale, gate) per token [B, T, d] from rows first, first + 1, first + 2."""
    shift, scale, gate = (_token_rows(table, s.adaln, s.timestep_index, first + i) for i in range(3))
    return shift, scale, gate


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# --------------------------------------------------------------------------------------------------------------
# the block (transformer.py BasicAVTransformerBlock)


class AVTransformerBlock(nn.Module):
    """One audio-video block: per stream self-attention and text cross-attention, then the A<->V exchange in
    both directions (on the states normalised before the exchange), then per stream FFN. Parameter names are
    the official ones; every block has the same structure and shapes."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dv, da, eps, gated = cfg.dim, cfg.audio_dim, cfg.norm_eps, cfg.gated_attention
        self.eps = eps
        self.cross_attention_adaln = cfg.cross_attention_adaln
        self.attn1 = Attention(dv, None, cfg.heads, cfg.head_dim, norm_eps=eps, gated=gated)
        self.attn2 = Attention(dv, dv, cfg.heads, cfg.head_dim, norm_eps=eps, gated=gated)
        self.ff = FeedForward(dv, FFN_MULT)
        self.scale_shift_table = nn.Parameter(torch.empty(cfg.adaln_rows, dv))
        self.audio_attn1 = Attention(da, None, cfg.audio_heads, cfg.audio_head_dim, norm_eps=eps, gated=gated)
        self.audio_attn2 = Attention(da, da, cfg.audio_heads, cfg.audio_head_dim, norm_eps=eps, gated=gated)
        self.audio_ff = FeedForward(da, FFN_MULT)
        self.audio_scale_shift_table = nn.Parameter(torch.empty(cfg.adaln_rows, da))
        # Q video, K/V audio, and the reverse; both at the audio head layout
        self.audio_to_video_attn = Attention(dv, da, cfg.audio_heads, cfg.audio_head_dim, norm_eps=eps, gated=gated)
        self.video_to_audio_attn = Attention(da, dv, cfg.audio_heads, cfg.audio_head_dim, norm_eps=eps, gated=gated)
        self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.empty(AV_SCALE_SHIFT_ROWS + 1, da))
        self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.empty(AV_SCALE_SHIFT_ROWS + 1, dv))
        if cfg.cross_attention_adaln:
            self.prompt_scale_shift_table = nn.Parameter(torch.empty(PROMPT_ADALN_ROWS, dv))
            self.audio_prompt_scale_shift_table = nn.Parameter(torch.empty(PROMPT_ADALN_ROWS, da))

    def _text_cross_attention(
        self,
        attn: Attention,
        x: torch.Tensor,
        context: torch.Tensor,
        table: torch.Tensor,
        prompt_table: torch.Tensor | None,
        s: StreamInputs,
    ) -> torch.Tensor:
        """Residual of the text cross-attention: 19B `attn(rms(x), ctx)`; 2.3 with query AdaLN (rows 6-8) and the
        prompt AdaLN on the context."""
        if prompt_table is None:
            return attn(rms_norm(x, self.eps), context)
        shift_q, scale_q, gate = _token_modulation(table, s, TEXT_CA_ROWS)
        b = x.shape[0]
        kv = prompt_table[None, None] + s.prompt.view(b, 1, PROMPT_ADALN_ROWS, -1)  # [B, 1, 2, d]
        shift_kv, scale_kv = kv[:, :, 0], kv[:, :, 1]
        return attn(_modulate(rms_norm(x, self.eps), scale_q, shift_q), _modulate(context, scale_kv, shift_kv)) * gate

    def _self_attention(self, attn: Attention, x: torch.Tensor, table: torch.Tensor, s: StreamInputs) -> torch.Tensor:
        shift, scale, gate = _token_modulation(table, s, SELF_ATTN_ROWS)
        return attn(_modulate(rms_norm(x, self.eps), scale, shift), pe=(s.pe_cos, s.pe_sin)) * gate

    def _feed_forward(self, ff: FeedForward, x: torch.Tensor, table: torch.Tensor, s: StreamInputs) -> torch.Tensor:
        shift, scale, gate = _token_modulation(table, s, FFN_ROWS)
        return ff(_modulate(rms_norm(x, self.eps), scale, shift)) * gate

    def forward(
        self,
        vx: torch.Tensor,
        ax: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
        video: StreamInputs,
        audio: StreamInputs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """vx [B, Nv, dv], ax [B, Na, da]; contexts [B, Nt, dv] / [B, Nt, da] (projected). Returns (vx, ax)."""
        prompt_v = self.prompt_scale_shift_table if self.cross_attention_adaln else None
        prompt_a = self.audio_prompt_scale_shift_table if self.cross_attention_adaln else None
        vx = vx + self._self_attention(self.attn1, vx, self.scale_shift_table, video)
        vx = vx + self._text_cross_attention(self.attn2, vx, video_context, self.scale_shift_table, prompt_v, video)
        ax = ax + self._self_attention(self.audio_attn1, ax, self.audio_scale_shift_table, audio)
        ax = ax + self._text_cross_attention(
            self.audio_attn2, ax, audio_context, self.audio_scale_shift_table, prompt_a, audio
        )

        # A<->V exchange; both directions read the states normalised before either residual is added.
        b = vx.shape[0]
        nv, na = rms_norm(vx, self.eps), rms_norm(ax, self.eps)
        tv, ta = self.scale_shift_table_a2v_ca_video, self.scale_shift_table_a2v_ca_audio
        xv = tv[None, None, :AV_SCALE_SHIFT_ROWS] + video.cross_scale_shift.view(b, 1, AV_SCALE_SHIFT_ROWS, -1)
        xa = ta[None, None, :AV_SCALE_SHIFT_ROWS] + audio.cross_scale_shift.view(b, 1, AV_SCALE_SHIFT_ROWS, -1)
        gate_v = tv[AV_SCALE_SHIFT_ROWS] + video.cross_gate  # [B, 1, dv]
        gate_a = ta[AV_SCALE_SHIFT_ROWS] + audio.cross_gate  # [B, 1, da]
        # rows: 0 scale_a2v, 1 shift_a2v, 2 scale_v2a, 3 shift_v2a
        vq = _modulate(nv, xv[:, :, 0], xv[:, :, 1])
        akv = _modulate(na, xa[:, :, 0], xa[:, :, 1])
        aq = _modulate(na, xa[:, :, 2], xa[:, :, 3])
        vkv = _modulate(nv, xv[:, :, 2], xv[:, :, 3])
        v_pe = (video.cross_pe_cos, video.cross_pe_sin)
        a_pe = (audio.cross_pe_cos, audio.cross_pe_sin)
        vx = vx + self.audio_to_video_attn(vq, akv, pe=v_pe, k_pe=a_pe) * gate_v
        ax = ax + self.video_to_audio_attn(aq, vkv, pe=a_pe, k_pe=v_pe) * gate_a

        vx = vx + self._feed_forward(self.ff, vx, self.scale_shift_table, video)
        ax = ax + self._feed_forward(self.audio_ff, ax, self.audio_scale_shift_table, audio)
        return vx, ax


# --------------------------------------------------------------------------------------------------------------
# the model (model.py LTXModel, transformer_args.py)


class LTXDiT(nn.Module):
    """The audio-video DiT; parameter names equal the official `LTXModel.state_dict()`."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dv, da = cfg.dim, cfg.audio_dim
        self.patchify_proj = nn.Linear(LATENT_CHANNELS, dv)
        self.audio_patchify_proj = nn.Linear(LATENT_CHANNELS, da)
        if cfg.caption_channels is not None:
            self.caption_projection = CaptionProjection(cfg.caption_channels, dv)
            self.audio_caption_projection = CaptionProjection(cfg.caption_channels, da)
        self.adaln_single = AdaLayerNormSingle(dv, cfg.adaln_rows)
        self.audio_adaln_single = AdaLayerNormSingle(da, cfg.adaln_rows)
        if cfg.cross_attention_adaln:
            self.prompt_adaln_single = AdaLayerNormSingle(dv, PROMPT_ADALN_ROWS)
            self.audio_prompt_adaln_single = AdaLayerNormSingle(da, PROMPT_ADALN_ROWS)
        self.av_ca_video_scale_shift_adaln_single = AdaLayerNormSingle(dv, AV_SCALE_SHIFT_ROWS)
        self.av_ca_audio_scale_shift_adaln_single = AdaLayerNormSingle(da, AV_SCALE_SHIFT_ROWS)
        self.av_ca_a2v_gate_adaln_single = AdaLayerNormSingle(dv, 1)
        self.av_ca_v2a_gate_adaln_single = AdaLayerNormSingle(da, 1)
        self.transformer_blocks = nn.ModuleList(AVTransformerBlock(cfg) for _ in range(cfg.num_layers))
        # output heads: LayerNorm without affine (functional) + shift/scale from the embedded timestep
        self.scale_shift_table = nn.Parameter(torch.empty(2, dv))
        self.audio_scale_shift_table = nn.Parameter(torch.empty(2, da))
        self.proj_out = nn.Linear(dv, LATENT_CHANNELS)
        self.audio_proj_out = nn.Linear(da, LATENT_CHANNELS)

    # ---- (a) preparation ------------------------------------------------------------------------------------

    def prepare_context(
        self, video_context: torch.Tensor, audio_context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text contexts from the connectors -> the blocks' contexts. 19B: caption projection
        [B, Nt, caption_channels] -> [B, Nt, d]; 2.3: identity ([B, Nt, dv] / [B, Nt, da]). Sigma-independent."""
        if self.cfg.caption_channels is None:
            return video_context, audio_context
        return self.caption_projection(video_context), self.audio_caption_projection(audio_context)

    def prepare_rope(
        self, video_pos: torch.Tensor, audio_pos: torch.Tensor, dtype: torch.dtype
    ) -> tuple[RopeTables, RopeTables, RopeTables, RopeTables]:
        """RoPE tables (video self, audio self, video cross, audio cross), each (cos, sin) [B, H, T, D/2] in
        `dtype` (the latent dtype). video_pos [B, 3, Nv, 2], audio_pos [B, 1, Na, 2], in the dtypes the
        official tools make them (`video_positions`, `audio_positions`): the arithmetic runs in that dtype."""
        c = self.cfg
        common = {"theta": c.theta, "use_middle": True, "out_dtype": dtype}
        pe_v = rope_tables(video_pos, inner_dim=c.dim, heads=c.heads, max_pos=c.max_pos, **common)
        pe_a = rope_tables(audio_pos, inner_dim=c.audio_dim, heads=c.audio_heads, max_pos=c.audio_max_pos, **common)
        # A<->V: time axis only, width audio_cross_attention_dim (= audio width), each modality's own heads
        cross = {"inner_dim": c.audio_dim, "max_pos": (c.cross_max_pos,), **common}
        xpe_v = rope_tables(video_pos[:, 0:1], heads=c.heads, **cross)
        xpe_a = rope_tables(audio_pos[:, 0:1], heads=c.audio_heads, **cross)
        return pe_v, pe_a, xpe_v, xpe_a

    def _cross_adaln(
        self, sigma: torch.Tensor, scale_shift: AdaLayerNormSingle, gate: AdaLayerNormSingle, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A<->V AdaLN from a sigma [B]: ([B, 1, 4d], [B, 1, d]) (transformer_args.py
        _prepare_cross_attention_timestep)."""
        b = sigma.shape[0]
        t = sigma * self.cfg.timestep_scale
        ss, _ = scale_shift(t, dtype)
        g, _ = gate(t * (self.cfg.av_timestep_scale / self.cfg.timestep_scale), dtype)
        return ss.view(b, 1, -1), g.view(b, 1, -1)

    def stream_modulation(
        self, stream: str, values: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`prepare_modulation` with the AdaLN of stream `stream` ("video" | "audio")."""
        adaln = self.adaln_single if stream == "video" else self.audio_adaln_single
        return self.prepare_modulation(adaln, values, dtype)

    def cross_modulation(
        self, stream: str, other_sigma: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The A<->V AdaLN fields of stream `stream` ("video" | "audio") from the OTHER modality's sigma [B]:
        (cross_scale_shift [B, 1, 4d], cross_gate [B, 1, d])."""
        if stream == "video":
            pair = self.av_ca_video_scale_shift_adaln_single, self.av_ca_a2v_gate_adaln_single
        else:
            pair = self.av_ca_audio_scale_shift_adaln_single, self.av_ca_v2a_gate_adaln_single
        return self._cross_adaln(other_sigma, *pair, dtype)

    def prompt_modulation(self, stream: str, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """LTX-2.3 prompt AdaLN of stream `stream` from its own sigma [B]: [B, 1, 2d] (`cfg.cross_attention_adaln`)."""
        adaln = self.prompt_adaln_single if stream == "video" else self.audio_prompt_adaln_single
        return adaln(sigma * self.cfg.timestep_scale, dtype)[0].view(sigma.shape[0], 1, -1)

    def prepare_modulation(
        self,
        adaln: AdaLayerNormSingle,
        values: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """AdaLN-single on unique timesteps values [B, K] -> (modulation [B, K, rows * d], embedded [B, K, d])."""
        b, k = values.shape
        mod, emb = adaln((values * self.cfg.timestep_scale).flatten(), dtype)
        return mod.view(b, k, -1), emb.view(b, k, -1)

    def prepare(
        self,
        *,
        video_timesteps: torch.Tensor,
        audio_timesteps: torch.Tensor,
        video_sigma: torch.Tensor,
        audio_sigma: torch.Tensor,
        video_positions: torch.Tensor,
        audio_positions: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[StreamInputs, StreamInputs]:
        """Everything sigma- and position-dependent, outside the hot graph.

        Args:
            video_timesteps / audio_timesteps: per-token timesteps [B, T] or [B, T, 1] (`denoise_mask * sigma`).
            video_sigma / audio_sigma: [B] or a scalar: this step's sigma of each modality.
            video_positions [B, 3, Nv, 2], audio_positions [B, 1, Na, 2]: see `video_positions`/`audio_positions`.
            dtype: the latent dtype (official `hidden_dtype` of the adaln inputs and the RoPE output dtype).
        """
        b = video_timesteps.shape[0]
        sv = video_sigma.reshape(-1).expand(b) if video_sigma.numel() == 1 else video_sigma.reshape(b)
        sa = audio_sigma.reshape(-1).expand(b) if audio_sigma.numel() == 1 else audio_sigma.reshape(b)
        pe_v, pe_a, xpe_v, xpe_a = self.prepare_rope(video_positions, audio_positions, dtype)
        video = self._prepare_stream(
            video_timesteps,
            sv,
            sa,
            self.adaln_single,
            getattr(self, "prompt_adaln_single", None),
            self.av_ca_video_scale_shift_adaln_single,
            self.av_ca_a2v_gate_adaln_single,
            dtype,
        )
        audio = self._prepare_stream(
            audio_timesteps,
            sa,
            sv,
            self.audio_adaln_single,
            getattr(self, "audio_prompt_adaln_single", None),
            self.av_ca_audio_scale_shift_adaln_single,
            self.av_ca_v2a_gate_adaln_single,
            dtype,
        )
        return StreamInputs(*video, *pe_v, *xpe_v), StreamInputs(*audio, *pe_a, *xpe_a)

    def _prepare_stream(
        self,
        timesteps: torch.Tensor,
        sigma: torch.Tensor,
        other_sigma: torch.Tensor,
        adaln: AdaLayerNormSingle,
        prompt_adaln: AdaLayerNormSingle | None,
        cross_scale_shift: AdaLayerNormSingle,
        cross_gate: AdaLayerNormSingle,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The AdaLN fields of one modality's `StreamInputs` (all but the RoPE tables); sigmas are [B]."""
        b = sigma.shape[0]
        values, index = unique_timesteps(timesteps)
        mod, embedded = self.prepare_modulation(adaln, values, dtype)
        prompt = None
        if prompt_adaln is not None:
            prompt = prompt_adaln(sigma * self.cfg.timestep_scale, dtype)[0].view(b, 1, -1)
        xss, xgate = self._cross_adaln(other_sigma, cross_scale_shift, cross_gate, dtype)
        return mod, index, embedded, xss, xgate, prompt

    # ---- (b) the hot forward ----------------------------------------------------------------------------------

    def _head(
        self, x: torch.Tensor, table: torch.Tensor, proj: nn.Linear, embedded: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """LayerNorm(no affine) -> x * (1 + scale) + shift (from the embedded timestep) -> Linear(d, 128)."""
        d = embedded.shape[-1]
        rows = table[None, None] + embedded[:, :, None]  # [B, K, 2, d]: shift, scale
        index = index.unsqueeze(-1).expand(-1, -1, d)
        shift = torch.gather(rows[:, :, 0], 1, index)
        scale = torch.gather(rows[:, :, 1], 1, index)
        x = F.layer_norm(x, (d,), eps=self.cfg.norm_eps)
        return proj(_modulate(x, scale, shift))

    def output_head(
        self, stream: str, x: torch.Tensor, embedded: torch.Tensor, timestep_index: torch.Tensor
    ) -> torch.Tensor:
        """The output head of stream `stream` ("video" | "audio") on token states `x` [B, T, d], from the
        embedded timesteps [B, K, d] and the per-token index [B, T] of its `StreamInputs`: velocities [B, T, 128]."""
        if stream == "video":
            return self._head(x, self.scale_shift_table, self.proj_out, embedded, timestep_index)
        return self._head(x, self.audio_scale_shift_table, self.audio_proj_out, embedded, timestep_index)

    def forward_prepared(
        self,
        video_latent: torch.Tensor,
        audio_latent: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
        video: StreamInputs,
        audio: StreamInputs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hot graph. video_latent [B, Nv, 128], audio_latent [B, Na, 128]; contexts already through
        `prepare_context`; `video`/`audio` from `prepare`. Returns velocities [B, Nv, 128], [B, Na, 128]."""
        vx = self.patchify_proj(video_latent)
        ax = self.audio_patchify_proj(audio_latent)
        for block in self.transformer_blocks:
            vx, ax = block(vx, ax, video_context, audio_context, video, audio)
        return (
            self.output_head("video", vx, video.embedded, video.timestep_index),
            self.output_head("audio", ax, audio.embedded, audio.timestep_index),
        )

    def forward(
        self,
        video_latent: torch.Tensor,
        audio_latent: torch.Tensor,
        *,
        video_timesteps: torch.Tensor,
        audio_timesteps: torch.Tensor,
        video_sigma: torch.Tensor,
        audio_sigma: torch.Tensor,
        video_positions: torch.Tensor,
        audio_positions: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Official `LTXModel.forward(video, audio, BatchedPerturbationConfig.empty(B))` on `Modality` fields:
        latent tokens, per-token timesteps (`denoise_mask * sigma`), sigma, positions and contexts. Returns the
        velocities (video [B, Nv, 128], audio [B, Na, 128])."""
        video, audio = self.prepare(
            video_timesteps=video_timesteps,
            audio_timesteps=audio_timesteps,
            video_sigma=video_sigma,
            audio_sigma=audio_sigma,
            video_positions=video_positions,
            audio_positions=audio_positions,
            dtype=video_latent.dtype,
        )
        ctx_v, ctx_a = self.prepare_context(video_context, audio_context)
        return self.forward_prepared(video_latent, audio_latent, ctx_v, ctx_a, video, audio)


# --------------------------------------------------------------------------------------------------------------
# stage


def build_dit(config: Mapping[str, Any]) -> LTXDiT:
    return LTXDiT(DiTConfig.from_config(config))


def randomize_dit(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights with O(1) activations, for parity tests and benchmarks (works on the official module too).

    Why not the default N(0, 0.02): through the tiny widths the AdaLN MLP output would be dominated by its
    bias, so the timestep path (and a wrong token -> timestep gather) would barely move the output, and the
    default's unit RMSNorm weights would not catch swapped q_norm / k_norm. Here: Linear weights
    N(0, 1/fan_in), biases N(0, 0.1), RMSNorm weights 1 + N(0, 0.1), scale-shift tables N(0, 0.1).
    """

    def draw(t: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return (mean + torch.randn(t.shape, generator=gen, device=gen.device) * std).to(t.dtype)

    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, nn.Linear):
                    p.copy_(draw(p, 1.0 / math.sqrt(m.in_features)) if name == "weight" else draw(p, 0.1))
                elif isinstance(m, nn.RMSNorm):
                    p.copy_(draw(p, 0.1, mean=1.0))
                else:
                    p.copy_(draw(p, 0.1))


def count_parameters(config: Mapping[str, Any]) -> int:
    """Number of DiT parameters for `config` (built on the meta device: instant at full size)."""
    with torch.device("meta"):
        module = build_dit(config)
    return sum(p.numel() for p in module.parameters())


def build_random_dit(
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    seed: int = 0,
) -> LTXDiT:
    """Full-size random DiT straight on `device` (meta -> to_empty -> on-device RNG); `build_random("dit", ...)`."""
    module = build_random("dit", config, dtype=dtype, device=device, seed=seed)
    if not isinstance(module, LTXDiT):  # pragma: no cover - the stage table points here
        raise TypeError(f"stage dit built {type(module).__name__}")
    return module


STAGES = (
    StageSpec(
        "dit",
        rules=(
            # the text connectors live under the DiT prefix but belong to the text_projection stage
            ("model.diffusion_model.video_embeddings_connector.", None),
            ("model.diffusion_model.audio_embeddings_connector.", None),
            ("model.diffusion_model.", ""),
        ),
        build=build_dit,
        randomize=randomize_dit,
    ),
)

__all__ = [
    "STAGES",
    "AVTransformerBlock",
    "DiTConfig",
    "LTXDiT",
    "StreamInputs",
    "audio_positions",
    "build_random_dit",
    "count_parameters",
    "patchify_audio",
    "patchify_video",
    "unique_timesteps",
    "unpatchify_audio",
    "unpatchify_video",
    "video_positions",
]
