"""Engine loaders, one per engine format `fvrt-run` executes; each returns an object with `run(key, *inputs,
layer=None)`.

Imported lazily by `fvrt.runtime.engine`, so a machine without a backend's library can still load engine
directories built with another backend.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from fvrt.runtime.manifest import EngineError, Manifest, StageEntry

# The engine formats `fvrt-run` executes, each with its loader module. TensorRT-family engines (`tensorrt`,
# `tensorrt-rtx`) are built, verified and described by the same manifest, but no loader runs them yet.
LOADER_MODULES = {"torch-aot": "fvrt.runtime.backends.aoti"}
RUNNABLE = f"fvrt-run executes {', '.join(LOADER_MODULES)} engines only"


def check_runnable(root: Path, manifest: Manifest, stages: list[str] | None = None) -> None:
    """Refuse, before any loading, an engine directory whose engines `stages` (default all) `fvrt-run` cannot run."""
    for name in stages or list(manifest.stages):
        entry = manifest.stages.get(name)
        if entry is not None and entry.backend not in LOADER_MODULES:
            raise EngineError(
                f"{root}: stage '{name}' is a {entry.backend} engine; {RUNNABLE} (build with --backend torch-aot)"
            )


def load_engine(root: Path, entry: StageEntry, device: torch.device) -> Any:
    """The loaded engine of manifest entry `entry` in engine directory `root`, on `device`."""
    module = LOADER_MODULES.get(entry.backend)
    if module is None:
        raise EngineError(
            f"{root}: stage '{entry.name}' is a {entry.backend} engine; {RUNNABLE} (build with --backend torch-aot)"
        )
    return importlib.import_module(module).load(root, entry, device)
