"""Engine loaders, one per backend; each returns an object with `run(key, *inputs, layer=None, out=None)`.

Imported lazily by `fvrt.runtime.engine`, so a machine without a backend's library can still load engine
directories built with another backend.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from fvrt.runtime.manifest import EngineError, StageEntry

LOADER_MODULES = {"torch-aot": "fvrt.runtime.backends.aoti"}


def load_engine(root: Path, entry: StageEntry, device: torch.device) -> Any:
    """The loaded engine of manifest entry `entry` in engine directory `root`, on `device`."""
    module = LOADER_MODULES.get(entry.backend)
    if module is None:
        raise EngineError(
            f"{root}: stage '{entry.name}' uses backend '{entry.backend}', which this runtime cannot run here "
            f"(runnable: {', '.join(LOADER_MODULES)})"
        )
    return importlib.import_module(module).load(root, entry, device)
