"""Load an engine directory and run its engines: the compiled side of the runtime's `EngineSet` protocol.

`EngineDir.open(path)` reads `manifest.json` and refuses, with one `EngineError` line, a directory that does not
match this machine (torch version, device, GPU compute capability) or whose files do not match their sha256.
Engines are loaded on first use. Imports no builder or model code (tests/test_layout.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from fvrt.runtime.backends import check_runnable, load_engine
from fvrt.runtime.manifest import EngineError, Manifest, read_manifest, verify
from fvrt.runtime.precision import min_compute_capability
from fvrt.runtime.shapes import TEXT_KEY

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
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        for name, entry in manifest.stages.items():  # low-bit engines need their tensor-core formats
            attention = entry.extra.get("attention")
            required = min_compute_capability(entry.precision, attention if isinstance(attention, str) else None)
            if required is None:
                continue
            need, what = required
            if cc < need:
                raise EngineError(
                    f"{root}: engine {name} is {what}, which needs a GPU of compute capability "
                    f"{need[0]}.{need[1]} or newer; this GPU is {cc[0]}.{cc[1]}"
                )
        check_attention_kernels(root, manifest, device)


def check_attention_kernels(root: Path, manifest: Manifest, device: torch.device) -> None:
    """Engines built with a call-back mode (fvrt.plugins.CALLBACK_ATTENTION: `--attention fa4`, `sage`, `fa3fp8`, `fa3`)
    call their op (`fvrt::<mode>_attention`) back through the dispatcher: register it (importing fvrt.plugins,
    which imports every plugin) before any engine loads, refuse in one line when its kernel cannot run here
    (package missing, or not a GPU it supports), and have a plugin that ships kernels with its engines (FA4) load
    them."""
    from fvrt.plugins import CALLBACK_ATTENTION

    for mode, plugin in CALLBACK_ATTENTION.items():
        users = [n for n, e in manifest.stages.items() if e.extra.get("attention") == mode]
        if not users:
            continue
        if why := plugin.supported(device):
            raise EngineError(f"{root}: engine {users[0]} was built with --attention {mode} ({plugin.NAME}): {why}")
        if (use_kernels := getattr(plugin, "use_kernels", None)) is not None:
            use_kernels(root, users)  # the kernels the build compiled, instead of compiling them again


class EngineDir:
    """A verified engine directory; implements `fvrt.runtime.protocol.EngineSet`.

    run(name, key, *inputs) -> outputs of engine `name` for shape key `key`; run_block(key, layer, *inputs)
    applies the DiT block engine with layer `layer`'s weights, run_text_layer(layer, *inputs) the Gemma layer.
    Shapes and dtypes of inputs are checked against the manifest (one-line ValueError)."""

    def __init__(self, root: Path, manifest: Manifest, device: torch.device) -> None:
        self.root, self.manifest, self.device = root, manifest, device
        # wall seconds spent loading engines at first use ("load") and parking weights in host memory ("park"),
        # summed over the process: what a cold run pays beyond a warm one, besides the CUDA-graph captures
        self.seconds: dict[str, float] = {"load": 0.0, "park": 0.0}
        self.config: dict[str, Any] = manifest.config
        self.profiles: dict[str, dict[str, Any]] = manifest.profiles
        self._engines: dict[str, Any] = {}
        dit_in = manifest.stages.get("dit_in")
        self.dtype = _TORCH_DTYPES.get(dit_in.inputs[0].dtype, torch.float32) if dit_in else torch.float32
        # Per-layer engines. DiT blocks: one engine per layer group (e.g. bf16 and FP8 blocks): global layer ->
        # (engine, its local weight set). Text encoder: `text_block`, one weight set per Gemma layer.
        self._blocks: dict[int, tuple[str, int]] = {}
        for name, entry in manifest.stages.items():
            if not name.startswith("dit_"):
                continue
            for local, layer in enumerate(entry.layers or range(entry.per_layer)):
                if int(layer) in self._blocks:
                    raise EngineError(f"{root}: DiT block {layer} is claimed by two engines")
                self._blocks[int(layer)] = (name, local)
        self.num_layers = len(self._blocks)
        if sorted(self._blocks) != list(range(self.num_layers)):
            raise EngineError(f"{root}: the block engines do not cover DiT blocks 0..{self.num_layers - 1}")
        text = manifest.stages.get("text_block")
        self.text_layer_kinds: list[int] = list(text.layer_kinds) if text else []
        if text is not None and len(self.text_layer_kinds) != text.per_layer:
            raise EngineError(f"{root}: text_block: layer_kinds does not give a kind for every layer")

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
        check_runnable(root, manifest, list(stages) if stages is not None else None)
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
            t = time.perf_counter()
            self._engines[name] = load_engine(self.root, self.manifest.stages[name], self.device)
            self.seconds["load"] += time.perf_counter() - t
        eng = self._engines[name]
        if getattr(eng, "offloaded", False):
            eng.onload()
        return eng

    def run(self, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.engine(name).run(key, *inputs)

    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        name, local = self._blocks[layer]
        vx, ax = self.engine(name).run(key, *inputs, layer=local)
        return vx, ax

    def run_text_layer(self, layer: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Apply `text_block` with Gemma layer `layer`'s weights: (hidden, mask, cos, sin) -> hidden."""
        (h,) = self.engine("text_block").run(TEXT_KEY, *inputs, layer=layer)
        return h

    def _group(self, names: Iterable[str]) -> set[str]:
        """Expand "dit" and "text_encoder" to their engines."""
        out = set(names)
        for group, prefix in (("dit", "dit_"), ("text_encoder", "text_")):
            if group in out:
                out |= {n for n in self.manifest.stages if n.startswith(prefix)}
        return out

    def offload(self, names: Iterable[str]) -> None:
        """Move the loaded engines `names` ("text_encoder" = its three engines) to pinned host memory; the next
        use copies them back (memory="offload": the 12B text encoder waits in host memory while the DiT and the
        decoders run)."""
        t = time.perf_counter()
        for n in self._group(names):
            eng = self._engines.get(n)
            if eng is not None and hasattr(eng, "offload"):
                eng.offload()
        self.seconds["park"] += time.perf_counter() - t

    def onload(self, names: Iterable[str]) -> None:
        """Start copying the offloaded engines `names` back to the device (asynchronous, on the current stream:
        work queued after it waits for the copies); engines not loaded or not offloaded are left as they are."""
        for n in self._group(names):
            eng = self._engines.get(n)
            if eng is not None and getattr(eng, "offloaded", False):
                eng.onload()

    def release(self, names: Iterable[str] | None = None) -> None:
        """Drop loaded engines and their weights (all, or `names`; "dit" = every DiT engine, "text_encoder" =
        text_in, text_block, text_out), freeing device memory between pipeline phases; a later call loads them
        again."""
        if names is None:
            self._engines.clear()
            return
        for n in self._group(names):
            self._engines.pop(n, None)


def open_engine_dir(path: str | Path, **kwargs: Any) -> EngineDir:
    """Shorthand for `EngineDir.open(path, ...)`."""
    return EngineDir.open(path, **kwargs)
