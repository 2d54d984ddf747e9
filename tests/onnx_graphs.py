"""Tiny engines exported to ONNX once per test session, shared by test_onnx.py and test_tensorrt.py.

Exporting the tiny audio decoder (vocoder) alone takes ~35 s on 2 cores, so each (version, precision) is
exported once, at the first shape key of every engine, into a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from test_engines import TINY, tiny_checkpoint

from fvrt import load_checkpoint
from fvrt.builder.backends import onnx_export as OX
from fvrt.builder.build import ENGINE_NAMES
from fvrt.builder.checkpoint import ModelVersion
from fvrt.builder.engines import EngineSpec, engine_specs

ENGINES = ENGINE_NAMES
ATTENTION_ENGINES = ("text_encoder", "dit_block")  # the engines whose model code calls attention


@dataclass
class Exported:
    """The specs of one tiny build and their ONNX graphs at the first shape key of each engine."""

    version: ModelVersion
    precision: str
    specs: dict[str, EngineSpec]
    graphs: dict[str, OX.ExportedGraph]
    export_seconds: dict[str, float]


def _scratch(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def tiny_files(version: ModelVersion) -> Path:
    """A tiny random release (main + upsampler + Gemma) on disk; loaded fp32 once to write it."""
    root = _scratch(f"fvrt-tiny-{version.value}-")
    tiny_checkpoint(root, version)
    return root


def tiny_specs(version: ModelVersion, precision: str) -> dict[str, EngineSpec]:
    """Fresh engine specs of the tiny release loaded in `precision` ("fp32" | "bf16")."""
    root = tiny_files(version)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    ckpt = load_checkpoint(
        root / "main.safetensors", upsampler=root / "up.safetensors", gemma=root / "gemma", dtype=dtype
    )
    return {s.name: s for s in engine_specs(ckpt, [TINY])}


@functools.cache
def exported(version: ModelVersion, precision: str) -> Exported:
    """Every tiny engine exported to ONNX at its first shape key (cached for the session)."""
    torch.manual_seed(0)
    specs = tiny_specs(version, precision)
    out = _scratch(f"fvrt-onnx-{version.value}-{precision}-")
    graphs, seconds = {}, {}
    for name in ENGINES:
        spec = specs[name]
        t0 = time.perf_counter()
        graphs[name] = OX.export_onnx(spec, spec.shape_keys[0], out / f"{name}.onnx")
        seconds[name] = time.perf_counter() - t0
    return Exported(version, precision, specs, graphs, seconds)
