"""Random-weight LTX-2 / LTX-2.3 releases for builds without downloaded weights.

- tiny: a complete official-format release written to a folder (main file, upsampler file, tiny Gemma folder)
  and loaded back through the strict loader, exactly as a real download would be. CPU-sized; the embedded
  default of `fvrt-build --random tiny` / `make engines`.
- full: full-size stages built directly on the target device (meta -> `to_empty` -> on-device RNG), never
  written to disk (the main file alone is ~40 GB). Stages a build does not need stay on the meta device, so a
  DiT-only GPU build does not also hold the 12B text encoder.

The random weights are a proxy for speed and numerics, never for output quality.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Gemma3TextConfig

from fvrt.builder.checkpoint import (
    STAGE_NAMES,
    LTXCheckpoint,
    ModelVersion,
    build_random,
    load_checkpoint,
    save_checkpoint,
    stage_spec,
)
from fvrt.builder.configs import full_config, tiny_config, upsampler_config

SIZES = ("tiny", "full")

# Gemma-3 12B text model (the encoder of every LTX-2 / 2.3 release): `text_config` of ltx-core 1.0.0's
# GEMMA3_CONFIG_FOR_LTX (= google/gemma-3-12b config.json), copied here because builder code must not import
# ltx-core. Only used to build a full-size random text encoder.
GEMMA3_12B_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "gemma3_text",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3840,
    "intermediate_size": 15360,
    "max_position_embeddings": 131072,
    "num_attention_heads": 16,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "rope_theta": 1000000,
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "vocab_size": 262208,
}
GEMMA_NORM_STD = 0.1  # Gemma norms multiply by (1 + w): w ~ N(0, 0.1) keeps them near identity
GEMMA_EMBED_STD = 0.5  # embeddings (scaled by sqrt(hidden) in forward) as the tiny Gemma draws them


def random_identity(size: str, version: ModelVersion, seed: int) -> str:
    """sha256 standing in for the checkpoint hash of a random build: the configs and the seed fix every weight."""
    cfg = tiny_config(version) if size == "tiny" else full_config(version)
    blob = {
        "random": size,
        "version": version.value,
        "seed": seed,
        "config": cfg,
        "upsampler": upsampler_config(version, tiny=size == "tiny"),
        "gemma": "tiny" if size == "tiny" else GEMMA3_12B_TEXT_CONFIG,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def write_tiny_release(folder: Path, version: ModelVersion, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write a tiny random official-format release: (main.safetensors, upsampler.safetensors, gemma/)."""
    from fvrt.builder.tiny_gemma import write_tiny_gemma

    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(version)
    main = {s: build_random(s, cfg, seed=seed + i) for i, s in enumerate(STAGE_NAMES) if s != "upsampler"}
    save_checkpoint(folder / "main.safetensors", main, cfg)
    up_cfg = upsampler_config(version, tiny=True)
    save_checkpoint(
        folder / "upsampler.safetensors", {"upsampler": build_random("upsampler", up_cfg, seed=seed)}, up_cfg
    )
    write_tiny_gemma(folder / "gemma", seed=seed)
    return folder / "main.safetensors", folder / "upsampler.safetensors", folder / "gemma"


def load_tiny_release(folder: Path, dtype: torch.dtype, device: torch.device | str) -> LTXCheckpoint:
    """Load a folder written by `write_tiny_release` (every stage)."""
    return load_checkpoint(
        folder / "main.safetensors",
        upsampler=folder / "upsampler.safetensors",
        gemma=folder / "gemma",
        dtype=dtype,
        device=device,
    )


def _randomize_gemma(module: nn.Module, gen: torch.Generator) -> None:
    """Norm weights N(0, 0.1), matrices N(0, 1/fan_in), embeddings N(0, 0.5): O(1) activations at any size."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                std = GEMMA_NORM_STD
            elif p.ndim == 2 and "embed" not in name:
                std = 1.0 / math.sqrt(p.shape[1])
            else:
                std = GEMMA_EMBED_STD
            p.copy_((torch.randn(p.shape, generator=gen, device=gen.device) * std).to(p.dtype))


def random_gemma_12b(dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """Full-size random Gemma-3 12B text encoder built straight on `device` (meta device: no memory)."""
    from fvrt.builder.models.gemma import GemmaTextEncoder

    config = Gemma3TextConfig.from_dict(dict(GEMMA3_12B_TEXT_CONFIG))
    with torch.device("meta"):
        module = GemmaTextEncoder(config)
    if device.type == "meta":
        return module.to(dtype).eval()
    module = module.to(dtype).to_empty(device=device)  # cast on meta: never the fp32 copy (12B: 44 GiB)
    _randomize_gemma(module, torch.Generator(device=device).manual_seed(seed))
    module.init_constants()
    return module.eval()


def _meta_stage(name: str, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Shapes only (meta device), in the build dtype: engine specs read the dtype off the modules."""
    with torch.device("meta"):
        return stage_spec(name).build(config).to(dtype).eval()


def full_random_checkpoint(
    version: ModelVersion,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    materialize: Iterable[str] | None = None,
) -> LTXCheckpoint:
    """Full-size random checkpoint in memory. `materialize`: the loader stage names to build on `device`
    ("text_encoder", "dit", ...; default all); the others stay on the meta device (shapes only)."""
    cfg = full_config(version)
    up_cfg = upsampler_config(version)
    wanted = set(materialize) if materialize is not None else {*STAGE_NAMES, "text_encoder"}
    ckpt = LTXCheckpoint(version=version, config=cfg, metadata={}, upsampler_config=up_cfg)
    for i, name in enumerate(STAGE_NAMES):
        stage_cfg = up_cfg if name == "upsampler" else cfg
        module = (
            build_random(name, stage_cfg, dtype=dtype, device=device, seed=seed + i)
            if name in wanted
            else _meta_stage(name, stage_cfg, dtype)
        )
        setattr(ckpt, name, module)
    te_device = device if "text_encoder" in wanted else torch.device("meta")
    ckpt.text_encoder = random_gemma_12b(dtype, te_device, seed=seed)
    return ckpt
