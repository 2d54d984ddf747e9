"""The backend protocol: what the build loop asks of every compiler, so that it never branches on a backend's name.

A backend is registered once in `fvrt.builder.backends.BACKENDS` (its module and the request options it takes);
its module defines a class implementing `Backend`. Adding a backend: see docs/engines.md ("adding a backend").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fvrt.builder.stages.base import EngineSpec
from fvrt.runtime.manifest import StageEntry

Log = Callable[[str], None]
Finish = Callable[[], StageEntry]  # waits for what `Backend.start` left running and describes the engine


class OptionError(ValueError):
    """A backend option the backend does not take or cannot use; the message is one line naming the flag."""


@dataclass(frozen=True)
class BackendOptions:
    """The request's backend options, as `fvrt-build` passes them (defaults = not given)."""

    attention: str = "default"
    target_ccs: tuple[str, ...] = ()
    cxx: str | None = None
    conv_layout: str = "auto"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    jobs: int = 1


# option field -> (flag, its default): an option away from its default is refused by backends that do not take it
OPTION_FLAGS: dict[str, tuple[str, Any]] = {
    "target_ccs": ("--target-cc", ()),
    "cxx": ("--cxx", None),
    "conv_layout": ("--conv-layout", "auto"),
    "jobs": ("--jobs", 1),
}


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend: the module defining it (imported only when it is used) and the options of
    `OPTION_FLAGS` it takes (`--attention` every backend takes, with its own choices); `refusals`: why, added to
    the refusal of an option it does not take; `verifies`: its engines run on this machine's torch (--verify)."""

    module: str
    options: frozenset[str] = frozenset()
    refusals: Mapping[str, str] = field(default_factory=dict)
    verifies: bool = False


class Backend(Protocol):
    """One configured backend (a class of its module, built by `configure`)."""

    name: str  # the manifest's `backend` field and the --backend value
    attention_choices: tuple[str, ...]  # its --attention values
    rebinds: bool  # `rebind` can bind new weights to an earlier build's code
    errors: tuple[type[Exception], ...]  # its exceptions that mean "this graph cannot be built" (bad input)

    def available(self) -> str | None:
        """None when this backend can build here, else the one-line reason (missing library, no GPU, ...)."""
        ...

    def refuse_precision(self, precision: str) -> str | None:
        """None when it can build `precision` (fvrt.runtime.precision) with its options, else the one-line reason."""
        ...

    def recipe(self) -> dict[str, Any]:
        """What besides the request characterises its engines (compiler, library version, targets): part of
        every build key."""
        ...

    def environment(self) -> dict[str, str | None]:
        """`BuildEnv` fields it decides (`tensorrt_version`, `compute_capability`); empty: the build machine's."""
        ...

    def engine_recipe(self, name: str) -> dict[str, Any]:
        """What it decides per engine `name` beyond `recipe` (torch-aot: the conv layout): part of the engine's
        code key."""
        ...

    def build(self, spec: EngineSpec, out_dir: Path, *, precision: str, log: Log) -> StageEntry:
        """Compile every shape key of `spec` into files under `out_dir` (engine files, and weights kept apart where
        the backend allows) and describe them. `out_dir` is the temporary build directory."""
        ...

    def start(self, spec: EngineSpec, out_dir: Path, *, precision: str, log: Log) -> Finish:
        """`build`, split where the model is no longer needed: everything that reads `spec`'s modules happens
        before it returns, so the build loop may free them; the returned call waits for the rest (compiles running
        in other processes) and returns the entry. A backend that compiles in this process does it all here."""
        ...

    def close(self) -> None:
        """Stop whatever `start` left running (worker processes); the build loop calls it once, also on failure."""
        ...

    def rebind(self, spec: EngineSpec, out_dir: Path, entry: StageEntry) -> StageEntry:
        """Keep `entry`'s code (already in `out_dir`) and write `spec`'s weights for it (only when `rebinds`)."""
        ...


def refuse_options(name: str, info: BackendInfo, options: BackendOptions, registry: Mapping[str, BackendInfo]) -> None:
    """OptionError for the first option of `options` given to backend `name` that does not take it."""
    for option, (flag, default) in OPTION_FLAGS.items():
        if getattr(options, option) != default and option not in info.options:
            takers = " | ".join(n for n, i in registry.items() if option in i.options)
            why = f" ({info.refusals[option]})" if option in info.refusals else ""
            raise OptionError(f"{flag}: only --backend {takers} takes it, not --backend {name}{why}")


def per_layer_fields(spec: EngineSpec) -> dict[str, Any]:
    """The typed `StageEntry` fields of a per-layer engine (none for the others): how many weight sets, their
    model layers and, for the Gemma layer, which attention kind each layer takes."""
    if not spec.per_layer:
        return {}
    kinds = list(spec.notes.get("layer_kinds", []))
    return {"per_layer": len(spec.per_layer), "layers": list(spec.layers), "layer_kinds": kinds}


def check_attention(name: str, choices: tuple[str, ...], attention: str) -> None:
    if attention not in choices:
        raise OptionError(f"--attention: choose one of {', '.join(choices)} for --backend {name}, got '{attention}'")


__all__ = [
    "OPTION_FLAGS",
    "Backend",
    "BackendInfo",
    "BackendOptions",
    "Finish",
    "OptionError",
    "check_attention",
    "per_layer_fields",
]
