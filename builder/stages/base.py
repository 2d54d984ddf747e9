"""What a stage family declares: its engines (name, loader stages, build properties) and, from a loaded checkpoint,
their `EngineSpec`s. Backends consume `EngineSpec`s and never look inside the model code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fvrt.builder.checkpoint import LTXCheckpoint
from fvrt.runtime.shapes import PIPELINE_STAGES, Profile


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


@dataclass(frozen=True)
class Engine:
    """One engine as its stage family declares it.

    loaders: the checkpoint loader stages (`LTXCheckpoint` fields) whose weights it reads. kernel_attention:
    the `--attention` kernel modes (fvrt.plugins.KERNEL_ATTENTION) reach it (the DiT's engines; every other
    engine keeps bf16 attention). conv_layout: its 3-D convolution weights take `--conv-layout` (the video VAE).
    variants: more than one engine of this name may be built, "<name>_<n>" (the DiT block: one per layer group
    of a quantised build).
    """

    name: str
    loaders: tuple[str, ...]
    kernel_attention: bool = False
    conv_layout: bool = False
    variants: bool = False

    def owns(self, name: str) -> bool:
        """Whether engine `name` is this engine or one of its variants."""
        return name == self.name or (self.variants and name.startswith(self.name + "_"))


@dataclass
class SpecContext:
    """What every family's `specs` reads: the loaded checkpoint, the profiles, and one generator for every
    sample input of the build (draws happen when a backend asks for inputs, in its order)."""

    ckpt: LTXCheckpoint
    profiles: Sequence[Profile]
    device: torch.device
    gen: torch.Generator
    dtype: torch.dtype  # the DiT's (the model dtype of the build)

    @property
    def stage_keys(self) -> dict[str, tuple[Profile, int]]:
        """Shape key -> (profile, pipeline stage) of the engines run at both pipeline stages."""
        return {p.key(s): (p, s) for p in self.profiles for s in PIPELINE_STAGES}

    @property
    def video_keys(self) -> dict[str, Profile]:
        """Shape key -> profile of the engines run once per video."""
        return {p.key(): p for p in self.profiles}

    def rand(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device).to(dtype or self.dtype)


@dataclass(frozen=True)
class StageFamily:
    """One stage family (text, dit, video, audio): its engines in build order, the `--stages` group naming all
    of them (None: none), and the function giving their specs."""

    name: str
    engines: tuple[Engine, ...]
    specs: Callable[[SpecContext], list[EngineSpec]]
    group: str | None = None

    @property
    def engine_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.engines)
