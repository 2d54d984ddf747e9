"""Eager PyTorch implementation of the runtime's `EngineSet` protocol, straight from the engine specs: the
reference every compiled engine and the pipeline are checked against."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from fvrt.builder.checkpoint import LTXCheckpoint
from fvrt.builder.stages import engine_specs
from fvrt.builder.stages.base import EngineSpec
from fvrt.builder.stages.dit import is_block_engine
from fvrt.runtime.shapes import Profile


class EagerEngineSet:
    """Runs each engine's module eagerly (no compilation); `run_block` applies the code of layer i's block engine
    (its group's first block) with layer i's weights through `torch.func.functional_call`, exactly as a compiled
    block engine is used."""

    def __init__(self, ckpt: LTXCheckpoint, profiles: Sequence[Profile], device: torch.device | str = "cpu") -> None:
        self.specs: dict[str, EngineSpec] = {s.name: s for s in engine_specs(ckpt, profiles, device=device)}
        self.device = torch.device(device)
        self.dtype = ckpt.dit.patchify_proj.weight.dtype
        # global block index -> (block engine spec, that block's weights); several specs when layer groups differ
        self._blocks: dict[int, tuple[EngineSpec, dict[str, torch.Tensor]]] = {
            i: (spec, dict(layer.named_parameters()))
            for spec in self.specs.values()
            if spec.per_layer and is_block_engine(spec.name)
            for i, layer in zip(spec.layers, spec.per_layer, strict=True)
        }
        self.num_layers = len(self._blocks)
        self.text_layer_kinds: list[int] = list(self.specs["text_block"].notes["layer_kinds"])
        self.config: dict[str, Any] = ckpt.config
        self.profiles = {p.name: p._asdict() for p in profiles}
        self.seconds: dict[str, float] = {"load": 0.0, "park": 0.0}  # nothing is loaded or parked: the modules are

    # The eager modules are the checkpoint's own, in memory for as long as the checkpoint is: releasing, parking
    # and restoring them is nothing to do (the pipeline's memory policies are for compiled engines).
    def release(self, names: Iterable[str] | None = None) -> None:
        pass

    def offload(self, names: Iterable[str]) -> None:
        pass

    def onload(self, names: Iterable[str]) -> None:
        pass

    @torch.no_grad()
    def run(self, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec = self.specs[name]
        if key not in spec.shape_keys:
            raise KeyError(f"engine {name} was not built for shape {key}; built: {', '.join(spec.shape_keys)}")
        out = spec.module_for(key)(*inputs)
        return out if isinstance(out, tuple) else (out,)

    @torch.no_grad()
    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec, weights = self._blocks[layer]
        return torch.func.functional_call(
            spec.module.block, weights, (*inputs[:4], *spec.module.fields_to_streams(inputs[4:]))
        )

    @torch.no_grad()
    def run_text_layer(self, layer: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Gemma layer `layer` (every layer runs the same code, which the text_block engine compiles once)."""
        spec = self.specs["text_block"]
        return type(spec.module)(spec.per_layer[layer])(*inputs)
