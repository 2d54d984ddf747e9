"""The DiT, cut into four engines so that build time and engine size do not grow with depth:

- `dit_prep`: everything sigma-dependent but block-independent (AdaLN for the K=2 timestep values a step has,
  cross-modal and prompt AdaLN, RoPE tables of the profile's fixed positions). Once per step.
- `dit_in`: patchify projections and the LTX-2 caption projection. Once per step.
- `dit_block`: ONE transformer block whose weights are inputs; the runtime applies it 48 times to the 48
  per-layer weight sets. A quantised build has one block engine per layer group (`layer_groups`: blocks whose
  Linears are quantised alike), "dit_block", "dit_block_1", ...
- `dit_out`: the output heads (LayerNorm, AdaLN from the embedded timestep, projection to 128).

Timesteps: a token's timestep is `mask * sigma`. In TI2AV the mask is 1 for generated tokens and 1 - strength
for the image-conditioned first latent frame. `dit_prep` therefore takes K=2 values [sigma, (1 - strength) *
sigma] and a per-token index (0 or 1); text-to-video uses index 0 everywhere. Audio has K=1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fvrt.builder.models import dit as D
from fvrt.builder.quant.layers import layer_groups
from fvrt.builder.stages.base import Engine, EngineSpec, SpecContext, StageFamily
from fvrt.runtime.shapes import LATENT_CHANNELS, TEXT_TOKENS, Profile

LOADERS = ("dit",)
BLOCK_ENGINE = "dit_block"
STREAMS = ("video", "audio")


def block_engine_name(group: int) -> str:
    """The block engine of layer group `group` (`layer_groups` order): "dit_block" for the group holding block 0
    (every block when all share one layer signature), "dit_block_1"... for the others (e.g. the FP8 blocks
    1-42 of a quantised build)."""
    return BLOCK_ENGINE if group == 0 else f"{BLOCK_ENGINE}_{group}"


def is_block_engine(name: str) -> bool:
    return name == BLOCK_ENGINE or name.startswith(BLOCK_ENGINE + "_")


def field_names(has_prompt: bool) -> list[str]:
    """`dit_prep`'s outputs = the block engines' field inputs: the video then the audio `StreamInputs` fields."""
    return [f"{s}_{n}" for s in STREAMS for n in D.StreamInputs.field_names(has_prompt)]


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
        dit = self.dit
        dtype = dit.patchify_proj.weight.dtype
        dev = video_t.device
        vpos = D.video_positions(f, h, w, fps, dtype=dtype, device=dev)
        apos = D.audio_positions(na, device=dev)
        pe_v, pe_a, xpe_v, xpe_a = dit.prepare_rope(vpos, apos, dtype)
        mod_v, emb_v = dit.stream_modulation("video", video_t, dtype)
        mod_a, emb_a = dit.stream_modulation("audio", audio_t, dtype)
        xss_v, xg_v = dit.cross_modulation("video", audio_sigma, dtype)
        xss_a, xg_a = dit.cross_modulation("audio", video_sigma, dtype)
        audio_index = torch.zeros(1, na, dtype=torch.int64, device=dev)
        outs_v: list[torch.Tensor] = [mod_v, video_index, emb_v, xss_v, xg_v]
        outs_a: list[torch.Tensor] = [mod_a, audio_index, emb_a, xss_a, xg_a]
        if dit.cfg.cross_attention_adaln:
            outs_v.append(dit.prompt_modulation("video", video_sigma, dtype))
            outs_a.append(dit.prompt_modulation("audio", audio_sigma, dtype))
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
        self.n_fields = len(D.StreamInputs.field_names(has_prompt))

    def fields_to_streams(self, fields: Sequence[torch.Tensor]) -> tuple[D.StreamInputs, D.StreamInputs]:
        n = self.n_fields
        return D.StreamInputs.from_fields(fields[:n], self.has_prompt), D.StreamInputs.from_fields(
            fields[n:], self.has_prompt
        )

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
        v = self.dit.output_head("video", vx, video_embedded, video_index)
        return v, self.dit.output_head("audio", ax, audio_embedded, audio_index)


def specs(ctx: SpecContext) -> list[EngineSpec]:
    dit: D.LTXDiT = ctx.ckpt.dit
    gen, device = ctx.gen, ctx.device
    has_prompt = dit.cfg.cross_attention_adaln
    by_key = ctx.stage_keys
    dit_keys = list(by_key)
    prep_modules = {k: DiTPrepEngine(dit, *p.latent(s), p.audio_latents, p.fps) for k, (p, s) in by_key.items()}
    ctx_widths = (dit.cfg.caption_channels or dit.cfg.dim, dit.cfg.caption_channels or dit.cfg.audio_dim)
    block_field_names = field_names(has_prompt)

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
            ctx.rand((1, p.video_tokens(s), LATENT_CHANNELS)),
            ctx.rand((1, p.audio_latents, LATENT_CHANNELS)),
            ctx.rand((1, TEXT_TOKENS, ctx_widths[0])),
            ctx.rand((1, TEXT_TOKENS, ctx_widths[1])),
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

    return [
        EngineSpec(
            "dit_prep",
            prep_modules[dit_keys[0]],
            ["video_t", "video_index", "audio_t", "video_sigma", "audio_sigma"],
            block_field_names,
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
    ]


FAMILY = StageFamily(
    "dit",
    (
        Engine("dit_prep", LOADERS, kernel_attention=True),
        Engine("dit_in", LOADERS, kernel_attention=True),
        Engine(BLOCK_ENGINE, LOADERS, kernel_attention=True, variants=True),
        Engine("dit_out", LOADERS, kernel_attention=True),
    ),
    specs,
    group="dit",
)


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
