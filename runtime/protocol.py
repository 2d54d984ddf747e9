"""The runtime's view of a set of engines: call an engine by name and shape key; nothing else.

Both the compiled engine directory (torch-aot today, TensorRT-family where it can run) and the builder's eager
reference (`fvrt.builder.eager.EagerEngineSet`, used by tests as the "eager PyTorch" side of every parity
check) implement this protocol, so the pipeline code is the same for both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch


class EngineSet(Protocol):
    device: torch.device
    dtype: torch.dtype  # activation dtype of the DiT and VAE engines (bf16 on GPU builds, fp32 for tiny CPU ones)
    num_layers: int  # how many times `dit_block` is applied per DiT pass
    text_layer_kinds: list[int]  # per Gemma layer: which (mask, cos, sin) triple of text_in's outputs it takes
    config: dict[str, Any]  # the checkpoint's `config` metadata
    profiles: dict[str, dict[str, Any]]  # name -> {"height", "width", "frames", "fps"}

    def run(self, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run engine `name` (e.g. "dit_prep", "video_decoder") built for shape key `key` ("1080p/s1",
        "1080p", or "any" for the text encoder)."""
        ...

    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the compiled DiT block with layer `layer`'s weights."""
        ...

    def run_text_layer(self, layer: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Apply `text_block` (one Gemma decoder layer) with layer `layer`'s weights."""
        ...

    seconds: dict[str, float]  # wall seconds spent loading engines ("load") and parking weights ("park"), summed

    def release(self, names: Iterable[str] | None = None) -> None:
        """Drop loaded engines (all, or `names`; "dit" = every DiT engine, "text_encoder" = the three text engines)
        to free device memory; a later call loads them again (the pipeline's memory="phase")."""
        ...

    def offload(self, names: Iterable[str]) -> None:
        """Park the loaded engines `names` in host memory; the next use copies them back (memory="offload")."""
        ...

    def onload(self, names: Iterable[str]) -> None:
        """Start copying offloaded engines `names` back to the device (asynchronous, on the current stream)."""
        ...
