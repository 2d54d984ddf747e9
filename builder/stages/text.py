"""The text encoder, cut like the DiT so that build time does not grow with Gemma's 48 layers (one monolithic
Gemma-3 12B graph did not finish compiling in 5 minutes on the H100):

- `text_in` (token ids, mask) -> embeddings, and per attention kind (full / sliding) the boolean mask and the
  rotary cos / sin tables;
- `text_block`: ONE Gemma decoder layer whose weights are inputs, applied to the 48 per-layer weight sets (local
  and global layers share the code: only the mask and rotary table differ; the runtime picks them per layer from
  `notes.layer_kinds`);
- `text_out` (all N + 1 hidden states, mask) -> final norm, feature extractor and connectors -> (video, audio)
  contexts.
"""

from __future__ import annotations

import torch
from torch import nn

from fvrt.builder.stages.base import Engine, EngineSpec, SpecContext, StageFamily
from fvrt.runtime.shapes import TEXT_KEY, TEXT_TOKENS

LOADERS = ("text_encoder", "text_projection")
PADDED_TOKENS = 37  # sample inputs: the last 37 of the 1024 tokens are padding (mask 0), as a short prompt's


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


def specs(ctx: SpecContext) -> list[EngineSpec]:
    gemma, gen, device = ctx.ckpt.text_encoder, ctx.gen, ctx.device
    vocab = gemma.config.vocab_size
    text_kinds = {"layer_kinds": list(gemma.layer_kind_index), "attention_kinds": list(gemma.attention_kinds)}
    kind_names = [f"{n}_{k.removesuffix('_attention')}" for k in gemma.attention_kinds for n in ("mask", "cos", "sin")]

    def text_in_inputs(_key: str) -> tuple[torch.Tensor, ...]:
        return (
            torch.randint(1, vocab, (1, TEXT_TOKENS), generator=gen, device=device),
            (torch.arange(TEXT_TOKENS, device=device) >= TEXT_TOKENS - PADDED_TOKENS).long().unsqueeze(0),
        )

    def text_block_inputs(key: str) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            h, *tables = TextInEngine(gemma)(*text_in_inputs(key))
        k = gemma.layer_kind_index[0]
        return (h, *tables[3 * k : 3 * k + 3])

    def text_out_inputs(key: str) -> tuple[torch.Tensor, ...]:
        _, mask = text_in_inputs(key)
        return ctx.rand((gemma.num_hidden_states, 1, TEXT_TOKENS, gemma.hidden_size)), mask

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
            TextOutEngine(gemma, ctx.ckpt.text_projection),
            ["states", "attention_mask"],
            ["video_context", "audio_context"],
            [TEXT_KEY],
            text_out_inputs,
        ),
    ]


FAMILY = StageFamily(
    "text",
    (Engine("text_in", LOADERS), Engine("text_block", LOADERS), Engine("text_out", LOADERS)),
    specs,
    group="text_encoder",
)
