"""What gets compiled: the engines of one build, each a tensor-in / tensor-out module with static shapes per
resolution profile. Backends (torch-aot, ONNX / TensorRT) consume `EngineSpec`s and never look inside the
model code.

Engines and why they are cut this way:
- the text encoder, cut like the DiT so that build time does not grow with Gemma's 48 layers (one monolithic
  Gemma-3 12B graph did not finish compiling in 5 minutes on the H100):
  `text_in` (token ids, mask) -> embeddings, and per attention kind (full / sliding) the boolean mask and the
  rotary cos / sin tables; `text_block`: ONE Gemma decoder layer whose weights are inputs, applied to the 48
  per-layer weight sets (local and global layers share the code: only the mask and rotary table differ; the
  runtime picks them per layer from `notes.layer_kinds`); `text_out` (all N + 1 hidden states, mask) -> final
  norm, feature extractor and connectors -> (video, audio) contexts.
- `dit_prep`: everything sigma-dependent but block-independent (AdaLN for the K=2 timestep values a step has,
  cross-modal and prompt AdaLN, RoPE tables of the profile's fixed positions). Once per step.
- `dit_in`: patchify projections and the LTX-2 caption projection. Once per step.
- `dit_block`: ONE transformer block whose weights are inputs; the runtime applies it 48 times to the 48
  per-layer weight sets. Build time and engine size do not grow with depth.
- `dit_out`: the output heads (LayerNorm, AdaLN from the embedded timestep, projection to 128).
- `video_encoder` (image conditioning), `upsampler` (with the latent un-/re-normalisation), `video_decoder`,
  `audio_decoder` (audio VAE decoder + vocoder).

Timesteps: a token's timestep is `mask * sigma`. In TI2AV the mask is 1 for generated tokens and 1 - strength
for the image-conditioned first latent frame. `dit_prep` therefore takes K=2 values [sigma, (1 - strength) *
sigma] and a per-token index (0 or 1); text-to-video uses index 0 everywhere. Audio has K=1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fvrt.builder.checkpoint import CheckpointError, LTXCheckpoint
from fvrt.builder.models import dit as D
from fvrt.builder.quant.layers import layer_groups
from fvrt.runtime.shapes import (
    AUDIO_CHANNELS,
    AUDIO_MEL_BINS,
    LATENT_CHANNELS,
    PIPELINE_STAGES,
    PRESET_PROFILES,
    TEXT_KEY,
    TEXT_TOKENS,
    Profile,
)


@dataclass
class EngineSpec:
    """One engine: a module whose forward takes and returns only tensors, and its inputs per shape key.

    shape_keys: the static shapes it is built for, e.g. ("1080p/s1", "1080p/s2") for the DiT engines, or
    ("any",) for the text encoder; `sample_inputs(key)` gives example inputs of that shape (random, in `dtype`).
    per_layer: for `dit_block`, the number of weight sets the runtime applies it to; the engine's weights are
    then inputs and the weights file holds `layers.{i}.<name>` for every layer.
    """

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    shape_keys: list[str]
    sample_inputs: Callable[[str], tuple[torch.Tensor, ...]]
    per_layer: list[nn.Module] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)  # global block index of each per_layer entry
    by_key: dict[str, nn.Module] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    # parity checks: which rows (dim 1, tokens) of the outputs carry meaning, from the inputs; None = all. The
    # Gemma layer's padded query rows attend to nothing and hold backend-dependent values (cuDNN: finite garbage,
    # math / mem-efficient: 0) that no valid token ever reads and the feature extractor zeroes
    valid_rows: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None

    def module_for(self, key: str) -> nn.Module:
        """The module to compile for shape key `key` (`by_key` overrides `module`, e.g. baked-in positions)."""
        return self.by_key.get(key, self.module)


BLOCK_ENGINE = "dit_block"


def block_engine_name(group: int) -> str:
    """The block engine of layer group `group` (`layer_groups` order): "dit_block" for the group holding block 0
    (every block when all share one layer signature), "dit_block_1"... for the others (e.g. the FP8 blocks
    1-42 of a quantised build)."""
    return BLOCK_ENGINE if group == 0 else f"{BLOCK_ENGINE}_{group}"


def is_block_engine(name: str) -> bool:
    return name == BLOCK_ENGINE or name.startswith(BLOCK_ENGINE + "_")


def _rand(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# wrappers


class TextInEngine(nn.Module):
    """(input_ids [1, 1024] int64, attention_mask [1, 1024] int64) -> (embeddings [1, 1024, D], then per attention
    kind in `GemmaTextEncoder.attention_kinds` order: mask [1, 1, 1024, 1024] bool, cos, sin [1, 1024, head_dim])."""

    def __init__(self, gemma: nn.Module) -> None:
        super().__init__()
        self.gemma = gemma

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.gemma.prologue(input_ids, attention_mask)


class TextBlockEngine(nn.Module):
    """(hidden [1, 1024, D], mask, cos, sin) -> hidden: one Gemma decoder layer; its weights are per-layer inputs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.block = layer  # named like DiTBlockEngine.block: per-layer weight inputs are "block.<param>"

    def forward(self, h: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from fvrt.builder.models.gemma import GemmaTextEncoder

        return GemmaTextEncoder.run_layer(self.block, h, mask, cos, sin)


class TextOutEngine(nn.Module):
    """(states [N + 1, 1, 1024, D]: the embeddings and each layer's output, attention_mask [1, 1024] int64) ->
    (video_context, audio_context): final norm, feature extractor, connectors."""

    def __init__(self, gemma: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.gemma, self.projection = gemma, projection

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projection(self.gemma.epilogue(states), attention_mask)


VIDEO_FIELDS = tuple(f"video_{n}" for n in D.StreamInputs._fields)
AUDIO_FIELDS = tuple(f"audio_{n}" for n in D.StreamInputs._fields)


def _stream_fields(s: D.StreamInputs) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in s if t is not None)


def _stream_names(prefix_fields: tuple[str, ...], has_prompt: bool) -> list[str]:
    return [n for n in prefix_fields if has_prompt or not n.endswith("_prompt")]


def _to_stream(tensors: Sequence[torch.Tensor], has_prompt: bool) -> D.StreamInputs:
    t = list(tensors)
    if not has_prompt:
        t.insert(D.StreamInputs._fields.index("prompt"), None)
    return D.StreamInputs(*t)


class DiTPrepEngine(nn.Module):
    """Per step: (video_t [1, 2], video_index [1, Nv] int64, audio_t [1, 1], video_sigma [1], audio_sigma [1]) ->
    the video and audio `StreamInputs` fields (see `D.StreamInputs`), for one latent shape with fixed positions."""

    def __init__(self, dit: D.LTXDiT, frames: int, height: int, width: int, audio: int, fps: float) -> None:
        super().__init__()
        self.dit = dit
        self.shape = (frames, height, width, audio, fps)

    def forward(
        self,
        video_t: torch.Tensor,
        video_index: torch.Tensor,
        audio_t: torch.Tensor,
        video_sigma: torch.Tensor,
        audio_sigma: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        f, h, w, na, fps = self.shape
        dtype = self.dit.patchify_proj.weight.dtype
        dev = video_t.device
        vpos = D.video_positions(f, h, w, fps, dtype=dtype, device=dev)
        apos = D.audio_positions(na, device=dev)
        pe_v, pe_a, xpe_v, xpe_a = self.dit.prepare_rope(vpos, apos, dtype)
        dit = self.dit
        mod_v, emb_v = dit.prepare_modulation(dit.adaln_single, video_t, dtype)
        mod_a, emb_a = dit.prepare_modulation(dit.audio_adaln_single, audio_t, dtype)
        xss_v, xg_v = dit._cross_adaln(
            audio_sigma, dit.av_ca_video_scale_shift_adaln_single, dit.av_ca_a2v_gate_adaln_single, dtype
        )
        xss_a, xg_a = dit._cross_adaln(
            video_sigma, dit.av_ca_audio_scale_shift_adaln_single, dit.av_ca_v2a_gate_adaln_single, dtype
        )
        audio_index = torch.zeros(1, na, dtype=torch.int64, device=dev)
        outs_v: list[torch.Tensor] = [mod_v, video_index, emb_v, xss_v, xg_v]
        outs_a: list[torch.Tensor] = [mod_a, audio_index, emb_a, xss_a, xg_a]
        if dit.cfg.cross_attention_adaln:
            scale = dit.cfg.timestep_scale
            outs_v.append(dit.prompt_adaln_single(video_sigma * scale, dtype)[0].view(1, 1, -1))
            outs_a.append(dit.audio_prompt_adaln_single(audio_sigma * scale, dtype)[0].view(1, 1, -1))
        # dense outputs: the RoPE tables are transposed views, and compiled engines take dense inputs only
        return tuple(t.contiguous() for t in (*outs_v, *pe_v, *xpe_v, *outs_a, *pe_a, *xpe_a))


class DiTInEngine(nn.Module):
    """(video_latent [1, Nv, 128], audio_latent [1, Na, 128], video_context, audio_context) ->
    (vx [1, Nv, dv], ax [1, Na, da], video_context, audio_context) ready for the blocks."""

    def __init__(self, dit: D.LTXDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self,
        video_latent: torch.Tensor,
        audio_latent: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx_v, ctx_a = self.dit.prepare_context(video_context, audio_context)
        return self.dit.patchify_proj(video_latent), self.dit.audio_patchify_proj(audio_latent), ctx_v, ctx_a


class DiTBlockEngine(nn.Module):
    """(vx, ax, video_context, audio_context, *video fields, *audio fields) -> (vx, ax) for one block."""

    def __init__(self, block: D.AVTransformerBlock, has_prompt: bool) -> None:
        super().__init__()
        self.block, self.has_prompt = block, has_prompt
        self.n_fields = len(_stream_names(VIDEO_FIELDS, has_prompt))

    def fields_to_streams(self, fields: Sequence[torch.Tensor]) -> tuple[D.StreamInputs, D.StreamInputs]:
        n = self.n_fields
        return _to_stream(fields[:n], self.has_prompt), _to_stream(fields[n:], self.has_prompt)

    def forward(
        self,
        vx: torch.Tensor,
        ax: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
        *fields: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block(vx, ax, video_context, audio_context, *self.fields_to_streams(fields))


class DiTOutEngine(nn.Module):
    """(vx, ax, video_embedded, video_index, audio_embedded, audio_index) -> velocities [1, Nv, 128], [1, Na, 128]."""

    def __init__(self, dit: D.LTXDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self,
        vx: torch.Tensor,
        ax: torch.Tensor,
        video_embedded: torch.Tensor,
        video_index: torch.Tensor,
        audio_embedded: torch.Tensor,
        audio_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dit = self.dit

        def head_inputs(emb: torch.Tensor, idx: torch.Tensor) -> D.StreamInputs:
            z = emb.new_zeros(())
            return D.StreamInputs(z, idx, emb, z, z, None, z, z, z, z)

        v = dit._output_head(vx, dit.scale_shift_table, dit.proj_out, head_inputs(video_embedded, video_index))
        a = dit._output_head(
            ax, dit.audio_scale_shift_table, dit.audio_proj_out, head_inputs(audio_embedded, audio_index)
        )
        return v, a


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


class AudioDecoderEngine(nn.Module):
    """Normalised audio latent [1, 8, Ta, 16] -> waveform [1, 2, samples] (audio VAE decoder + vocoder)."""

    def __init__(self, decoder: nn.Module, vocoder: nn.Module) -> None:
        super().__init__()
        self.decoder, self.vocoder = decoder, vocoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vocoder(self.decoder(latent))


# --------------------------------------------------------------------------------------------------------------
# the specs of one build


def _stats(ckpt: LTXCheckpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """The video VAE's per-channel latent statistics (mean-of-means, std-of-means) [128]."""
    vae = ckpt.video_encoder if ckpt.video_encoder is not None else ckpt.video_decoder
    if vae is None:
        raise CheckpointError("the upsampler engine needs the video VAE statistics: load video_encoder or decoder")
    stats = vae.per_channel_statistics
    return getattr(stats, "mean-of-means"), getattr(stats, "std-of-means")


def engine_specs(
    ckpt: LTXCheckpoint, profiles: Sequence[Profile], *, device: torch.device | str = "cpu", seed: int = 0
) -> list[EngineSpec]:
    """Every engine of a build for `profiles`, from the loaded stages of `ckpt` (all must be loaded)."""
    missing = [
        s
        for s in (
            "text_encoder",
            "text_projection",
            "dit",
            "video_encoder",
            "video_decoder",
            "upsampler",
            "audio_decoder",
            "vocoder",
        )
        if getattr(ckpt, s) is None
    ]
    if missing:
        raise CheckpointError(f"a build needs every stage; not loaded: {', '.join(missing)}")
    for p in profiles:
        p.validate()
    device = torch.device(device)
    dit: D.LTXDiT = ckpt.dit
    dtype = dit.patchify_proj.weight.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    has_prompt = dit.cfg.cross_attention_adaln
    by_key = {p.key(s): (p, s) for p in profiles for s in PIPELINE_STAGES}
    dit_keys = list(by_key)
    prep_modules = {k: DiTPrepEngine(dit, *p.latent(s), p.audio_latents, p.fps) for k, (p, s) in by_key.items()}
    ctx_widths = (dit.cfg.caption_channels or dit.cfg.dim, dit.cfg.caption_channels or dit.cfg.audio_dim)

    def prep_inputs(key: str) -> tuple[torch.Tensor, ...]:
        p, s = by_key[key]
        nv = p.video_tokens(s)
        sigma = torch.rand(1, generator=gen, device=device)
        video_t = torch.stack([sigma, torch.zeros_like(sigma)], dim=-1)  # [1, 2]: sigma, conditioned tokens at 0
        index = torch.zeros(1, nv, dtype=torch.int64, device=device)
        index[:, : nv // p.latent(s)[0]] = 1  # first latent frame image-conditioned
        return video_t, index, sigma.view(1, 1), sigma, sigma

    def in_inputs(key: str) -> tuple[torch.Tensor, ...]:
        p, s = by_key[key]
        return (
            _rand((1, p.video_tokens(s), LATENT_CHANNELS), dtype, device, gen),
            _rand((1, p.audio_latents, LATENT_CHANNELS), dtype, device, gen),
            _rand((1, TEXT_TOKENS, ctx_widths[0]), dtype, device, gen),
            _rand((1, TEXT_TOKENS, ctx_widths[1]), dtype, device, gen),
        )

    def block_inputs(key: str) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            fields = prep_modules[key](*prep_inputs(key))
            vx, ax, cv, ca = DiTInEngine(dit)(*in_inputs(key))
        return (vx, ax, cv, ca, *fields)

    def out_inputs(key: str) -> tuple[torch.Tensor, ...]:
        b = block_inputs(key)
        names = ["vx", "ax", "video_context", "audio_context", *block_field_names]
        got = dict(zip(names, b, strict=True))
        return (
            got["vx"],
            got["ax"],
            got["video_embedded"],
            got["video_timestep_index"],
            got["audio_embedded"],
            got["audio_timestep_index"],
        )

    block_field_names = [*_stream_names(VIDEO_FIELDS, has_prompt), *_stream_names(AUDIO_FIELDS, has_prompt)]
    prep_outputs = block_field_names
    full = {p.name: p for p in profiles}
    gemma = ckpt.text_encoder
    vocab = gemma.config.vocab_size if hasattr(gemma, "config") else 1000
    text_kinds = {"layer_kinds": list(gemma.layer_kind_index), "attention_kinds": list(gemma.attention_kinds)}
    kind_names = [f"{n}_{k.removesuffix('_attention')}" for k in gemma.attention_kinds for n in ("mask", "cos", "sin")]

    def text_in_inputs(_key: str) -> tuple[torch.Tensor, ...]:
        return (
            torch.randint(1, vocab, (1, TEXT_TOKENS), generator=gen, device=device),
            (torch.arange(TEXT_TOKENS, device=device) >= TEXT_TOKENS - 37).long().unsqueeze(0),
        )

    def text_block_inputs(key: str) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            h, *tables = TextInEngine(gemma)(*text_in_inputs(key))
        k = gemma.layer_kind_index[0]
        return (h, *tables[3 * k : 3 * k + 3])

    def text_out_inputs(key: str) -> tuple[torch.Tensor, ...]:
        _, mask = text_in_inputs(key)
        states = _rand((gemma.num_hidden_states, 1, TEXT_TOKENS, gemma.hidden_size), dtype, device, gen)
        return states, mask

    return [
        EngineSpec(
            "text_in",
            TextInEngine(gemma),
            ["input_ids", "attention_mask"],
            ["embeddings", *kind_names],
            [TEXT_KEY],
            text_in_inputs,
            notes=text_kinds,
        ),
        EngineSpec(
            "text_block",
            TextBlockEngine(gemma.model.layers[0]),
            ["hidden", "mask", "cos", "sin"],
            ["hidden_out"],
            [TEXT_KEY],
            text_block_inputs,
            per_layer=list(gemma.model.layers),
            layers=list(range(len(gemma.model.layers))),
            notes=text_kinds,
            valid_rows=lambda inputs: inputs[1][0, 0].any(-1),  # query rows with at least one key to attend
        ),
        EngineSpec(
            "text_out",
            TextOutEngine(gemma, ckpt.text_projection),
            ["states", "attention_mask"],
            ["video_context", "audio_context"],
            [TEXT_KEY],
            text_out_inputs,
        ),
        EngineSpec(
            "dit_prep",
            prep_modules[dit_keys[0]],
            ["video_t", "video_index", "audio_t", "video_sigma", "audio_sigma"],
            prep_outputs,
            dit_keys,
            prep_inputs,
            by_key=prep_modules,
        ),
        EngineSpec(
            "dit_in",
            DiTInEngine(dit),
            ["video_latent", "audio_latent", "video_context", "audio_context"],
            ["vx", "ax", "video_context_out", "audio_context_out"],
            dit_keys,
            in_inputs,
        ),
        *(
            EngineSpec(
                block_engine_name(j),
                DiTBlockEngine(dit.transformer_blocks[group[0]], has_prompt),
                ["vx", "ax", "video_context", "audio_context", *block_field_names],
                ["vx_out", "ax_out"],
                dit_keys,
                block_inputs,
                per_layer=[dit.transformer_blocks[i] for i in group],
                layers=list(group),
            )
            for j, group in enumerate(layer_groups(list(dit.transformer_blocks)))
        ),
        EngineSpec(
            "dit_out",
            DiTOutEngine(dit),
            ["vx", "ax", "video_embedded", "video_index", "audio_embedded", "audio_index"],
            ["video_velocity", "audio_velocity"],
            dit_keys,
            out_inputs,
        ),
        EngineSpec(
            "video_encoder",
            ckpt.video_encoder,
            ["image"],
            ["latent"],
            dit_keys,
            lambda k: (
                _rand(
                    (1, 3, 1, by_key[k][0].height // (3 - by_key[k][1]), by_key[k][0].width // (3 - by_key[k][1])),
                    dtype,
                    device,
                    gen,
                ).clamp(-1, 1),
            ),
        ),
        EngineSpec(
            "upsampler",
            UpsamplerEngine(ckpt.upsampler, *_stats(ckpt)),
            ["latent"],
            ["latent_up"],
            list(full),
            lambda k: (_rand((1, LATENT_CHANNELS, *full[k].latent(1)), dtype, device, gen),),
        ),
        EngineSpec(
            "video_decoder",
            ckpt.video_decoder,
            ["latent"],
            ["video"],
            list(full),
            lambda k: (_rand((1, LATENT_CHANNELS, *full[k].latent(2)), dtype, device, gen),),
        ),
        EngineSpec(
            "audio_decoder",
            AudioDecoderEngine(ckpt.audio_decoder, ckpt.vocoder),
            ["latent"],
            ["waveform"],
            list(full),
            lambda k: (_rand((1, AUDIO_CHANNELS, full[k].audio_latents, AUDIO_MEL_BINS), dtype, device, gen),),
        ),
    ]


def dit_forward_kwargs(
    profile: Profile,
    stage: int,
    prep_inputs: Sequence[torch.Tensor],
    in_inputs: Sequence[torch.Tensor],
    *,
    positions_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The DiT engine chain's inputs (`dit_prep` inputs, `dit_in` inputs) as `LTXDiT.forward` keywords, positions
    of the profile's stage-`stage` latent in `positions_dtype` on the latents' device."""
    video_t, index, audio_t, video_sigma, audio_sigma = prep_inputs
    f, h, w = profile.latent(stage)
    dev = in_inputs[0].device
    return {
        "video_latent": in_inputs[0],
        "audio_latent": in_inputs[1],
        "video_timesteps": video_t.gather(1, index),
        "audio_timesteps": audio_t.expand(1, profile.audio_latents),
        "video_sigma": video_sigma,
        "audio_sigma": audio_sigma,
        "video_positions": D.video_positions(f, h, w, profile.fps, dtype=positions_dtype, device=dev),
        "audio_positions": D.audio_positions(profile.audio_latents, device=dev),
        "video_context": in_inputs[2],
        "audio_context": in_inputs[3],
    }


def dit_reference(
    dit: D.LTXDiT, profile: Profile, stage: int, prep_inputs: Sequence[torch.Tensor], in_inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own forward on the same inputs as the DiT engine chain (`dit_prep` inputs, `dit_in` inputs):
    the reference the prep -> in -> block x N -> out split is checked against."""
    with torch.no_grad():
        return dit(**dit_forward_kwargs(profile, stage, prep_inputs, in_inputs))


__all__ = [
    "PRESET_PROFILES",
    "EngineSpec",
    "Profile",
    "block_engine_name",
    "dit_forward_kwargs",
    "dit_reference",
    "engine_specs",
    "is_block_engine",
]
