# Ported from ltx_core/quantization/fp8_scaled_mm.py (ltx-core 1.0.0): `_apply_fp8_prepare_to_model` (which
# layers become FP8Linear before loading); here the layers are found from the file instead of a fixed list.
"""Quantised layers in a module tree: pre-quantised checkpoints and per-layer engine groups.

Pre-quantised files. An official `-fp8` release stores each FP8 Linear as `<layer>.weight` float8_e4m3fn
[out, in] plus `<layer>.weight_scale` and `<layer>.input_scale` (float32 []), bias unchanged. The loader
(`fvrt.builder.checkpoint.load_stage`) calls `prepare_prequantized` on the module freshly built on the meta
device: every layer with a `.weight_scale` in the file becomes an `FP8Linear` (or an `NVFP4Linear` when the
file also has `.weight_scale_2`, fvrt's own NVFP4 layout), so no calibration is needed and the strict loader
then fills them like any other tensor. Their weights and scales keep the stored dtypes.

Per-layer engines. The DiT block engine is compiled once and applied to every block's weights. With an
exclusion list, blocks differ in which Linears are quantised, so the engine builder compiles one block per
`block_signature` and applies each to its `layer_groups` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fvrt.builder.quant.fp8 import FP8Linear
from fvrt.builder.quant.nvfp4 import NVFP4Linear
from fvrt.builder.safetensors_io import CheckpointError

WEIGHT_SCALE_SUFFIX = ".weight_scale"
INPUT_SCALE_SUFFIX = ".input_scale"
NVFP4_GLOBAL_SUFFIX = ".weight_scale_2"
QUANT_METADATA_KEY = "_quantization_metadata"
"""Header metadata key of the official quantised releases (the ModelOpt recipe, JSON); informational only."""

LINEAR_TYPES = (nn.Linear, FP8Linear, NVFP4Linear)


class PrequantizedError(CheckpointError):
    """A pre-quantised tensor layout fvrt does not understand; the message names the tensor."""


def prepare_prequantized(
    module: nn.Module,
    checkpoint_keys: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    module_key: Callable[[str], str | None],
) -> set[str]:
    """Swap the `nn.Linear`s that the file stores pre-quantised for FP8Linear / NVFP4Linear (on meta).

    checkpoint_keys: checkpoint key -> (dtype, shape) of every tensor in the file; module_key: the stage's
    checkpoint-key -> module-key map (None for keys of other stages). Returns the module keys whose stored
    dtype must be kept (quantised weights and their scales).
    """
    by_module = {mk: info for ck, info in checkpoint_keys.items() if (mk := module_key(ck)) is not None}
    layers = sorted(k[: -len(WEIGHT_SCALE_SUFFIX)] for k in by_module if k.endswith(WEIGHT_SCALE_SUFFIX))
    keep: set[str] = set()
    for layer in layers:
        try:
            linear = module.get_submodule(layer)
        except AttributeError:
            raise PrequantizedError(f"'{layer}{WEIGHT_SCALE_SUFFIX}': the model has no layer '{layer}'") from None
        if type(linear) is not nn.Linear:
            raise PrequantizedError(f"'{layer}{WEIGHT_SCALE_SUFFIX}': '{layer}' is {type(linear).__name__}, not Linear")
        if layer + INPUT_SCALE_SUFFIX not in by_module:
            raise PrequantizedError(f"'{layer}' has a weight_scale but no input_scale (weight-only FP8 unsupported)")
        wdtype, _ = by_module[layer + ".weight"]
        bias = linear.bias is not None
        bias_dtype = by_module[layer + ".bias"][0] if bias and layer + ".bias" in by_module else None
        with torch.device("meta"):
            if layer + NVFP4_GLOBAL_SUFFIX in by_module:
                if wdtype != torch.uint8:
                    raise PrequantizedError(f"'{layer}.weight' is {wdtype}, NVFP4 weights are packed uint8")
                new: nn.Module = NVFP4Linear(linear.in_features, linear.out_features, bias, bias_dtype=bias_dtype)
                names = ("weight", "weight_scale", "weight_scale_2", "input_scale")
            else:
                if wdtype != torch.float8_e4m3fn:
                    raise PrequantizedError(f"'{layer}.weight' is {wdtype}, FP8 weights must be float8_e4m3fn")
                new = FP8Linear(linear.in_features, linear.out_features, bias, bias_dtype=bias_dtype)
                names = ("weight", "weight_scale", "input_scale")
        parent_name, _, attr = layer.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
        keep.update(f"{layer}.{n}" for n in names)
    return keep


def block_signature(block: nn.Module) -> tuple[tuple[str, str], ...]:
    """(name, layer type) of every Linear-like layer in `block`: blocks with equal signatures can share one
    compiled block engine (their parameters have the same names, shapes and dtypes)."""
    return tuple((n, type(m).__name__) for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES))


def layer_groups(blocks: Sequence[nn.Module]) -> list[list[int]]:
    """Block indices grouped by `block_signature`, groups in order of first appearance. With the official
    exclusion list on 48 blocks: [[0, 43, 44, 45, 46, 47], [1, ..., 42]]."""
    groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, b in enumerate(blocks):
        groups.setdefault(block_signature(b), []).append(i)
    return list(groups.values())


__all__ = [
    "QUANT_METADATA_KEY",
    "PrequantizedError",
    "block_signature",
    "layer_groups",
    "prepare_prequantized",
]
