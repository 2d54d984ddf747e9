"""fvrt: ahead-of-time compiled engines and a lean runtime for LTX-2 / LTX-2.3.

`fvrt.builder` holds the model definitions and the checkpoint loader; `fvrt.runtime` only loads engines.
Importing `fvrt` imports neither: `load_checkpoint` is resolved lazily so that the runtime never pays
for (or depends on) model code.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "load_checkpoint":
        from fvrt.builder.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'fvrt' has no attribute {name!r}")
