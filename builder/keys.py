"""Build keys (style item 4): what characterises an engine directory and each engine, hashed from canonical JSON.

The build key (recipe + checkpoint identity + tool versions) says whether a directory is up to date; per engine,
the code key (recipe, architecture config, tools) says whether its compiled code can be reused, and the stage key
(code key + checkpoint + layer list) whether the whole engine can. No paths, no times.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import fvrt
from fvrt.builder.precision import low_bit_kind
from fvrt.builder.random_release import random_identity
from fvrt.builder.request import Plan, calibration_files
from fvrt.builder.stages import stage_attention
from fvrt.builder.stages.base import EngineSpec
from fvrt.runtime.manifest import FORMAT_VERSION, sha256_file
from fvrt.runtime.precision import QUANTIZED


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_identity(plan: Plan) -> dict[str, str | None]:
    """sha256 of every weight source: main file, upsampler file, Gemma weights (random: config + seed)."""
    req = plan.request
    if req.random is not None:
        assert plan.version is not None
        return {"main": random_identity(req.random, plan.version, req.seed)}
    gemma = None
    if req.gemma is not None:
        files = sorted(p for p in Path(req.gemma).iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
        gemma = sha256_json({p.name: sha256_file(p) for p in files})
    return {
        "main": sha256_file(Path(req.checkpoint)),
        "upsampler": sha256_file(Path(req.upsampler)) if req.upsampler else None,
        "gemma": gemma,
    }


def tool_versions(device: torch.device) -> dict[str, str | None]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cc = "{}.{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    return {"fvrt": fvrt.__version__, "torch": torch.__version__, "gpu": gpu, "compute_capability": cc}


def recipe(plan: Plan) -> dict[str, Any]:
    """What characterises the artifact besides the weights (style item 4): no paths, no times."""
    req = plan.request
    out = {
        "format": FORMAT_VERSION,
        "backend": req.backend,
        "precision": req.precision,
        "device": req.device,
        "attention": req.attention,
        "conv_layout": req.conv_layout,
        "profiles": [p._asdict() for p in plan.profiles],
        "stages": plan.stages,
    }
    if req.precision in QUANTIZED and req.calib_inputs is not None:
        out["calibration"] = {"method": req.calib_method, "inputs_sha256": _tensors_sha256(req.calib_inputs)}
    elif req.precision in QUANTIZED:  # the scales depend on the calibration data
        prompts, images = calibration_files(req)
        out["calibration"] = {
            "method": req.calib_method,
            "count": req.calib_count,
            "prompts_sha256": sha256_file(prompts),
            "images_sha256": [sha256_file(p) for p in images],
        }
    if req.text_precision != "bf16":  # the text scales depend on the calibration prompts
        prompts, _ = calibration_files(req)
        out["text"] = {
            "precision": req.text_precision,
            "method": req.calib_method,
            "prompts_sha256": sha256_file(prompts),
        }
    return {**out, **plan.backend.recipe()}  # compiler, library version, target GPUs


def _tensors_sha256(passes: Sequence[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for kw in passes:
        for name in sorted(kw):
            t = kw[name]
            h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stage_keys(
    plan: Plan, stage: str, config: dict[str, Any], ckpt_id: dict[str, Any], spec: EngineSpec | None = None
) -> tuple[str, str]:
    """(code key, stage key) of one engine: the code depends on the recipe, the architecture config and the tools;
    the whole stage (code + weights) also on the checkpoint and, for per-layer engines, on its layer list."""
    r = {k: v for k, v in plan.recipe.items() if k != "stages"}
    r["attention"] = stage_attention(r["attention"], stage)
    del r["conv_layout"]
    r.update(plan.backend.engine_recipe(stage))  # what the backend decides per engine (torch-aot: conv layout)
    low = low_bit_kind(spec) if spec is not None else None
    text = stage.startswith("text_")
    if not text or low is None:
        r.pop("text", None)  # the text encoder's quantisation keys only the engines holding its FP8 layers
    if r["precision"] in QUANTIZED and (text or low is None):
        # an engine of an fp8 / nvfp4 build without DiT low-bit layers (text, VAE, the DiT's bf16 blocks, prep,
        # in, out) is the bf16 engine, with the bf16 keys: a directory of bf16 engines lends it (its code, and its
        # weights where the layer list is the same), so an fp8 build next to a bf16 one compiles only the FP8 blocks
        r["precision"] = "bf16"
        r.pop("calibration", None)
    code = sha256_json({"stage": stage, **r, "config": config, "tools": tool_versions(plan.device)})
    layers = {"layers": spec.layers} if spec is not None and spec.per_layer else {}
    return code, sha256_json({"code": code, "checkpoint": ckpt_id, **layers})
