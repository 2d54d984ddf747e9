"""Load an engine directory and run its engines: the compiled side of the runtime's `EngineSet` protocol.

`EngineDir.open(path)` reads `manifest.json` and refuses, with one `EngineError` line, a directory that does not
match this machine (torch version, device, GPU compute capability) or whose files do not match their sha256.
Engines are loaded on first use. Imports no builder or model code (tests/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fvrt.runtime.backends import load_engine
from fvrt.runtime.manifest import EngineError, Manifest, read_manifest, verify

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def machine_compute_capability(device: torch.device) -> str | None:
    """ "9.0" for an H100; None on the CPU."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def check_environment(root: Path, manifest: Manifest, device: torch.device) -> None:
    """Refuse engines built for another device kind, GPU or torch (AOTInductor code is tied to all three)."""
    built = manifest.build.device
    if device.type != built:
        raise EngineError(f"{root}: engines were built for device '{built}', asked to run them on '{device.type}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"{root}: engines were built for CUDA and this machine has no usable CUDA GPU")


class EngineDir:
    """A verified engine directory; implements `fvrt.runtime.protocol.EngineSet`.

    run(name, key, *inputs) -> outputs of engine `name` for shape key `key`; run_block(key, layer, *inputs)
    applies the DiT block engine with layer `layer`'s weights. Shapes and dtypes of inputs are checked against
    the manifest (one-line ValueError)."""

    def __init__(self, root: Path, manifest: Manifest, device: torch.device) -> None:
        self.root, self.manifest, self.device = root, manifest, device
        self.config: dict[str, Any] = manifest.config
        self.profiles: dict[str, dict[str, Any]] = manifest.profiles
        self._engines: dict[str, Any] = {}
        dit_in = manifest.stages.get("dit_in")
        self.dtype = _TORCH_DTYPES.get(dit_in.inputs[0].dtype, torch.float32) if dit_in else torch.float32
        block = manifest.stages.get("dit_block")
        self.num_layers = int(block.extra.get("per_layer", 0)) if block else 0

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        device: torch.device | str | None = None,
        stages: Sequence[str] | None = None,
    ) -> EngineDir:
        """Read and verify `path` (sha256 of every file of `stages`, default all; torch version; device; GPU
        compute capability). device: default the manifest's (the current CUDA device for CUDA builds)."""
        root = Path(path)
        manifest = read_manifest(root)
        dev = torch.device(device if device is not None else manifest.build.device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        check_environment(root, manifest, dev)
        verify(
            root,
            manifest,
            torch_version=torch.__version__,
            compute_capability=machine_compute_capability(dev),
            stages=list(stages) if stages is not None else None,
        )
        return cls(root, manifest, dev)

    def engine(self, name: str) -> Any:
        """The loaded engine `name` (loaded and its weights moved to the device on first use)."""
        if name not in self._engines:
            if name not in self.manifest.stages:
                raise EngineError(f"{self.root}: no engine '{name}' (has: {', '.join(self.manifest.stages)})")
            self._engines[name] = load_engine(self.root, self.manifest.stages[name], self.device)
        return self._engines[name]

    def run(self, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.engine(name).run(key, *inputs)

    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vx, ax = self.engine("dit_block").run(key, *inputs, layer=layer)
        return vx, ax

    def release(self) -> None:
        """Drop every loaded engine and its weights (frees device memory between pipeline phases)."""
        self._engines.clear()


def open_engine_dir(path: str | Path, **kwargs: Any) -> EngineDir:
    """Shorthand for `EngineDir.open(path, ...)`."""
    return EngineDir.open(path, **kwargs)
