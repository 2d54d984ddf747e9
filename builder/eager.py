"""Eager PyTorch implementation of the runtime's `EngineSet` protocol, straight from the engine specs: the
reference every compiled engine and the pipeline are checked against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fvrt.builder.checkpoint import LTXCheckpoint
from fvrt.builder.engines import EngineSpec, Profile, engine_specs


class EagerEngineSet:
    """Runs each engine's module eagerly (no compilation); `run_block` applies block 0's code with layer i's
    weights through `torch.func.functional_call`, exactly as a compiled block engine is used."""

    def __init__(self, ckpt: LTXCheckpoint, profiles: Sequence[Profile], device: torch.device | str = "cpu") -> None:
        self.specs: dict[str, EngineSpec] = {s.name: s for s in engine_specs(ckpt, profiles, device=device)}
        self.device = torch.device(device)
        self.dtype = ckpt.dit.patchify_proj.weight.dtype
        block = self.specs["dit_block"]
        self.num_layers = len(block.per_layer)
        self._layer_weights = [dict(layer.named_parameters()) for layer in block.per_layer]
        self.config: dict[str, Any] = ckpt.config
        self.profiles = {p.name: p._asdict() for p in profiles}

    @torch.no_grad()
    def run(self, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec = self.specs[name]
        if key not in spec.shape_keys:
            raise KeyError(f"engine {name} was not built for shape {key}; built: {', '.join(spec.shape_keys)}")
        out = spec.module_for(key)(*inputs)
        return out if isinstance(out, tuple) else (out,)

    @torch.no_grad()
    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.specs["dit_block"]
        return torch.func.functional_call(
            spec.module.block, self._layer_weights[layer], (*inputs[:4], *spec.module.fields_to_streams(inputs[4:]))
        )
