"""Loader for `torch-aot` engines: one AOTInductor package per shape key plus a safetensors file of the
weights they take as their first inputs (see fvrt.builder.backends.aoti for the layout)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fvrt.runtime.hostmem import host_copy_lists
from fvrt.runtime.manifest import EngineError, StageEntry, TensorSpec

LAYER_PREFIX = "layers.{}."  # same layout as the builder writes


def _load_models(root: Path, files: dict[str, str], device: torch.device) -> dict[str, Any]:
    """Shape key -> loaded AOTInductor model (one single-model package per key).

    `run_single_threaded=True`: the default model container guards its model instances with CUDA events
    (`cudaEventQuery` / `cudaEventSynchronize` on the previous run) which are illegal inside a CUDA-graph capture;
    the first H100 pipeline run died there ("operation not permitted when stream is capturing", text_in). The
    runtime calls every engine from one thread, the case the single-threaded runner is for."""
    index = (device.index or 0) if device.type == "cuda" else -1
    return {key: _load_package(root / file, index) for key, file in files.items()}


# Loaded AOTInductor packages, kept for the life of the process and shared by every engine object that runs them.
# memory="phase" drops an engine (its weights) after its phase and opens it again for the next video; loading a
# package again extracts it anew and dlopens a fresh copy of its library, which is never unloaded: host memory
# grew by ~9 MiB a video on the tiny engines. The compiled code is host memory, small next to the weights (which
# are inputs of every call, so a loaded package holds no device memory of its own), so it stays loaded.
_PACKAGES: dict[tuple[str, int, int, int, int], Any] = {}


def _load_package(path: Path, device_index: int) -> Any:
    """The loaded package at `path` for this device, loaded once (a file replaced since is loaded anew)."""
    from torch._inductor import aoti_load_package

    st = path.stat()
    key = (str(path.resolve()), device_index, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _PACKAGES:
        _PACKAGES[key] = aoti_load_package(str(path), run_single_threaded=True, device_index=device_index)
    return _PACKAGES[key]


class AOTIEngine:
    """One compiled engine. `run(key, *inputs)` binds the weights and the inputs (checked against the manifest's
    shapes and dtypes), runs on the current CUDA stream (or the CPU) and returns the outputs. dit_block:
    `layer=i` selects the i-th weight set."""

    def __init__(
        self, root: Path, entry: StageEntry, device: torch.device, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """tensors: the weights-file tensors given in memory (shared, not copied) instead of reading the file."""
        self.name, self.entry, self.device = entry.name, entry, device
        names, self.num_layers = list(entry.weight_names), entry.per_layer
        try:
            models: dict[str, str] = dict(entry.extra["models"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{root}: stage '{entry.name}' manifest entry lacks {e}") from None
        if tensors is None:
            tensors = load_file(str(root / entry.weights), device=str(device)) if entry.weights else {}
        try:
            if self.num_layers:
                self.layers = [[tensors[LAYER_PREFIX.format(i) + n] for n in names] for i in range(self.num_layers)]
            else:
                self.weights = [tensors[n] for n in names]
        except KeyError as e:
            raise EngineError(f"{root}: stage '{entry.name}' weights file has no tensor {e}") from None
        self.inputs: list[TensorSpec] = entry.inputs
        self.outputs: list[TensorSpec] = entry.outputs
        self.shape_keys = list(models)
        self._models = _load_models(root, models, device)
        self._host: list[list[torch.Tensor]] | None = None  # page-locked host copies, made at the first offload
        self._parked = False  # the weights in use are the host copies (offloaded)

    def _weight_lists(self) -> list[list[torch.Tensor]]:
        return self.layers if self.num_layers else [self.weights]

    @property
    def offloaded(self) -> bool:
        return self._parked

    def offload(self) -> None:
        """Park the weights in pinned host memory, freeing their device memory (the compiled code stays loaded;
        weights are inputs of every call, so nothing else holds a device address). Weights never change, so the
        host copies are made once, at the first offload, and kept: parking again only drops the device copies
        (the 1080p runs re-allocated 24 GB of pinned memory and copied it back on every prompt: ~14.5 s warm)."""
        if self._parked or self.device.type == "cpu":
            return
        lists = self._weight_lists()
        if self._host is None:  # one registered block (cudaHostAlloc took 10-16 s for 23.5 GB, GPU stalled)
            self._host = host_copy_lists(lists, async_copies=True)
        for ws, hs in zip(lists, self._host, strict=True):
            ws[:] = hs
        self._parked = True

    def onload(self) -> None:
        """Copy the parked weights back to the device (asynchronously, on the current stream)."""
        if not self._parked or self._host is None:
            return
        for ws, hs in zip(self._weight_lists(), self._host, strict=True):
            ws[:] = [h.to(self.device, non_blocking=True) for h in hs]
        self._parked = False

    def check_inputs(self, key: str, inputs: Sequence[torch.Tensor]) -> None:
        """One-line ValueError naming the input when count, shape, dtype, device or contiguity differ from what
        the engine was compiled for."""
        if key not in self._models:
            raise ValueError(f"engine {self.name} was not built for shape {key}; built: {', '.join(self._models)}")
        if len(inputs) != len(self.inputs):
            raise ValueError(f"engine {self.name} takes {len(self.inputs)} inputs, got {len(inputs)}")
        for t, spec in zip(inputs, self.inputs, strict=True):
            want = spec.shapes[key]
            if list(t.shape) != want or str(t.dtype).removeprefix("torch.") != spec.dtype:
                raise ValueError(
                    f"engine {self.name} [{key}] input '{spec.name}': expected {spec.dtype} {want}, "
                    f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
                )
            if t.device.type != self.device.type:
                raise ValueError(f"engine {self.name} input '{spec.name}' is on {t.device}, engine on {self.device}")
            if not t.is_contiguous():
                # compiled code assumes the dense strides it was traced with; a view would be misread silently
                raise ValueError(f"engine {self.name} input '{spec.name}' is not contiguous (pass .contiguous())")

    def run(
        self,
        key: str,
        *inputs: torch.Tensor,
        layer: int | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        """Run shape key `key`. Returns the outputs ([shapes as in the manifest])."""
        if check:
            self.check_inputs(key, inputs)
        if self._parked:
            raise ValueError(f"engine {self.name} is offloaded to host memory: onload() it before running")
        if self.num_layers:
            if layer is None or not 0 <= layer < self.num_layers:
                raise ValueError(f"engine {self.name} needs layer= in [0, {self.num_layers}), got {layer}")
            weights = self.layers[layer]
        else:
            weights = self.weights
        result = self._models[key](*weights, *inputs)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def load(root: Path, entry: StageEntry, device: torch.device) -> AOTIEngine:
    """Loader entry point (see fvrt.runtime.backends.load_engine)."""
    return AOTIEngine(root, entry, device)
