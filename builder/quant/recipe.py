# Ported from ltx_core/quantization/fp8_scaled_mm.py (ltx-core 1.0.0): the exclusion list `EXCLUDED_LAYER_SUBSTRINGS`,
# rewritten as globs over module names.
"""Precision recipes: which Linear layers of a stage run in FP8 / NVFP4, and which stay in the model dtype.

A recipe selects `nn.Linear` modules by name with `fnmatch` globs (`*` also matches dots): a layer is
quantised when it matches some `include` glob and no `exclude` glob. The default exclusion list is the one
ltx-core applies to the official FP8 checkpoints (`fp8_scaled_mm.py::EXCLUDED_LAYER_SUBSTRINGS`, substring
matches, written here as `*substring*`): block 0 and blocks 43-47, every AdaLN MLP, the patchify projections,
the caption projections (19B) and the output projections stay in bf16. The first and last blocks and the
timestep / input / output projections are where quantisation error is least diluted (they touch the latents
and the timestep conditioning of all tokens directly), so the release keeps them at full precision.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn


class Precision(enum.Enum):
    BF16 = "bf16"  # no quantisation (the engines' model dtype)
    FP8 = "fp8"  # E4M3 weights and static per-tensor E4M3 activations (Hopper / Ada)
    NVFP4 = "nvfp4"  # E2M1 weights and activations in 16-blocks, E4M3 block scales, FP32 global (Blackwell)


OFFICIAL_EXCLUDED_SUBSTRINGS: tuple[str, ...] = (
    "patchify_proj",
    "adaln_single",
    "av_ca_video_scale_shift_adaln_single",
    "av_ca_a2v_gate_adaln_single",
    "caption_projection",
    "proj_out",
    "audio_patchify_proj",
    "audio_adaln_single",
    "av_ca_audio_scale_shift_adaln_single",
    "av_ca_v2a_gate_adaln_single",
    "audio_caption_projection",
    "audio_proj_out",
    "transformer_blocks.0.",
    *(f"transformer_blocks.{i}." for i in range(43, 48)),
)
"""ltx-core 1.0.0 `EXCLUDED_LAYER_SUBSTRINGS`, verbatim (a layer is excluded when its name contains one)."""

DIT_DEFAULT_EXCLUDE: tuple[str, ...] = tuple(f"*{s}*" for s in OFFICIAL_EXCLUDED_SUBSTRINGS)
"""The official list as globs: `fnmatch(name, "*s*")` is exactly `s in name` (no glob characters in s)."""

TEXT_ENCODER_DEFAULT_EXCLUDE: tuple[str, ...] = ("*embed_tokens*", "*lm_head*")
"""Text encoder FP8 (Gemma-3 Linear layers + feature extractor + connectors): embeddings and the unused LM head
stay in the model dtype. Not measured yet."""


@dataclass(frozen=True)
class QuantRecipe:
    """What to quantise in one build.

    precision: the DiT Linear layers' format. include / exclude: globs over DiT module names (see module doc).
    FP8 attention is not a recipe switch: it is the backend's `--attention fp8` (fvrt.plugins.fp8_attention).
    The text encoder's FP8 (`--text-precision fp8`) uses the same recipe with `TEXT_ENCODER_DEFAULT_EXCLUDE`.
    """

    precision: Precision = Precision.FP8
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DIT_DEFAULT_EXCLUDE

    @classmethod
    def named(cls, precision: str | Precision) -> QuantRecipe:
        """The default recipe for `--precision bf16|fp8|nvfp4`."""
        try:
            p = precision if isinstance(precision, Precision) else Precision(precision)
        except ValueError:
            names = ", ".join(x.value for x in Precision)
            raise ValueError(f"--precision must be one of {names}, got {precision!r}") from None
        return cls(precision=p)

    def selects(self, name: str, *, exclude: Iterable[str] | None = None, include: Iterable[str] | None = None) -> bool:
        """Whether the layer called `name` is quantised (include match and no exclude match)."""
        inc = self.include if include is None else tuple(include)
        exc = self.exclude if exclude is None else tuple(exclude)
        return any(fnmatch.fnmatchcase(name, g) for g in inc) and not any(fnmatch.fnmatchcase(name, g) for g in exc)

    def select_linears(self, model: nn.Module, *, exclude: Iterable[str] | None = None) -> list[str]:
        """Names of the `nn.Linear` modules of `model` the recipe quantises (empty for bf16), in module order."""
        if self.precision is Precision.BF16:
            return []
        exc = self.exclude if exclude is None else tuple(exclude)
        return [n for n, m in model.named_modules() if type(m) is nn.Linear and self.selects(n, exclude=exc)]

    def to_json(self) -> dict[str, object]:
        """What characterises the artifact (for the engine manifest and cache keys)."""
        return {
            "precision": self.precision.value,
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


__all__ = [
    "DIT_DEFAULT_EXCLUDE",
    "OFFICIAL_EXCLUDED_SUBSTRINGS",
    "TEXT_ENCODER_DEFAULT_EXCLUDE",
    "Precision",
    "QuantRecipe",
]
