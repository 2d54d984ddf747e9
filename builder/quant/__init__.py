"""Quantisation of the stages: FP8 (Hopper / Ada) and NVFP4 (Blackwell) Linear layers, precision recipes,
calibration, and loading of pre-quantised checkpoints. See docs/quantization.md."""

from fvrt.builder.quant.calibrate import (
    QuantReport,
    collect_amax_hooks,
    collect_amax_modelopt,
    quantize_model,
)
from fvrt.builder.quant.fp8 import FP8Linear
from fvrt.builder.quant.layers import block_signature, layer_groups, prepare_prequantized
from fvrt.builder.quant.nvfp4 import NVFP4Linear
from fvrt.builder.quant.recipe import DIT_DEFAULT_EXCLUDE, Precision, QuantRecipe

__all__ = [
    "DIT_DEFAULT_EXCLUDE",
    "FP8Linear",
    "NVFP4Linear",
    "Precision",
    "QuantRecipe",
    "QuantReport",
    "block_signature",
    "collect_amax_hooks",
    "collect_amax_modelopt",
    "layer_groups",
    "prepare_prequantized",
    "quantize_model",
]
