"""Engine backends: one stage contract (`fvrt.builder.engines.EngineSpec`), several compilers.

Each backend module defines `BACKEND`, an object with:
- `name`: "torch-aot" | "tensorrt" | "tensorrt-rtx" (the manifest's `backend` field);
- `available() -> str | None`: None when usable here, else the one-line reason (missing library, no GPU...);
- `build(spec, out_dir, *, precision, log) -> fvrt.runtime.manifest.StageEntry`: compile every shape key of
  `spec` into files under `out_dir` (engine files, and weights kept apart where the backend allows) and
  describe them. `out_dir` is the temporary build directory; the caller renames it into place at the end.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKEND_MODULES = {
    "torch-aot": "fvrt.builder.backends.aoti",
    "tensorrt": "fvrt.builder.backends.tensorrt",
    "tensorrt-rtx": "fvrt.builder.backends.tensorrt",
}


def get_backend(name: str) -> Any:
    """The backend object for `name`; ValueError (one line) for an unknown name."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend '{name}'; choose one of: {', '.join(BACKEND_MODULES)}")
    mod = importlib.import_module(BACKEND_MODULES[name])
    return mod.backend(name) if hasattr(mod, "backend") else mod.BACKEND
