"""The stages of a build, declared once: one module per stage family (text, dit, video, audio), each declaring its
engines (name, the loader stages whose weights they read, build properties) and their `EngineSpec`s per profile.

Everything that lists engines reads this package: `--stages` (`ENGINE_NAMES`, `STAGE_GROUPS`), which loader stages
a partial build loads (`loader_stages`), the torch-aot conv layout and FP8 attention (`engine`), and the specs
(`engine_specs`). Adding a stage: see docs/engines.md ("adding a stage").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fvrt.builder.checkpoint import CheckpointError, LTXCheckpoint
from fvrt.builder.stages import audio, dit, text, video
from fvrt.builder.stages.base import Engine, EngineSpec, SpecContext, StageFamily
from fvrt.plugins import KERNEL_ATTENTION
from fvrt.runtime.shapes import Profile

FAMILIES: tuple[StageFamily, ...] = (text.FAMILY, dit.FAMILY, video.FAMILY, audio.FAMILY)  # build order
ENGINES: tuple[Engine, ...] = tuple(e for f in FAMILIES for e in f.engines)
ENGINE_NAMES: tuple[str, ...] = tuple(e.name for e in ENGINES)
STAGE_GROUPS: dict[str, tuple[str, ...]] = {f.group: f.engine_names for f in FAMILIES if f.group is not None}
LOADER_STAGES: tuple[str, ...] = tuple(dict.fromkeys(s for e in ENGINES for s in e.loaders))


def engine(name: str) -> Engine:
    """The declaration of engine `name` (a variant such as "dit_block_1" included); KeyError for an unknown one."""
    for e in ENGINES:
        if e.owns(name):
            return e
    raise KeyError(f"unknown engine '{name}'; engines: {', '.join(ENGINE_NAMES)}")


def stage_attention(attention: str, name: str) -> str:
    """The --attention engine `name` is built with: the kernel modes (FP8, FlashAttention-4) reach only the
    engines declaring `kernel_attention` (the DiT's); the others keep bf16 cuDNN attention (and the build keys of a
    cudnn build, so they are shared with it)."""
    return "cudnn" if attention in KERNEL_ATTENTION and not engine(name).kernel_attention else attention


def loader_stages(engines: Iterable[str]) -> set[str]:
    """The loader stages whose weights the given engines read."""
    return {s for name in engines for s in engine(name).loaders}


def engine_specs(
    ckpt: LTXCheckpoint, profiles: Sequence[Profile], *, device: torch.device | str = "cpu", seed: int = 0
) -> list[EngineSpec]:
    """Every engine of a build for `profiles`, from the loaded stages of `ckpt` (all must be loaded), in build
    order; their sample inputs draw from one generator seeded with `seed`."""
    missing = [s for s in LOADER_STAGES if getattr(ckpt, s) is None]
    if missing:
        raise CheckpointError(f"a build needs every stage; not loaded: {', '.join(missing)}")
    for p in profiles:
        p.validate()
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    ctx = SpecContext(ckpt, profiles, device, gen, ckpt.dit.patchify_proj.weight.dtype)
    return [spec for family in FAMILIES for spec in family.specs(ctx)]


__all__ = [
    "ENGINES",
    "ENGINE_NAMES",
    "FAMILIES",
    "STAGE_GROUPS",
    "Engine",
    "EngineSpec",
    "SpecContext",
    "StageFamily",
    "engine",
    "engine_specs",
    "loader_stages",
    "stage_attention",
]
