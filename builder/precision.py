"""The precision step of a build: calibrate and quantise the loaded model in place (`--precision fp8 | nvfp4`:
the DiT's Linears; `--text-precision fp8`: the Gemma decoder layers), and the manifest precision of each engine.
The precisions themselves are the table of `fvrt.runtime.precision`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fvrt.builder.checkpoint import LTXCheckpoint
from fvrt.builder.request import Plan, calibration_files
from fvrt.builder.stages.base import EngineSpec
from fvrt.builder.tokenizer import calib_tokenizer
from fvrt.runtime.precision import PRECISIONS as PRECISION_TABLE
from fvrt.runtime.precision import QUANTIZED

Log = Callable[[str], None]


def low_bit_kind(spec: EngineSpec) -> str | None:
    """The low-bit kind ("nvfp4" / "fp8") the engine computes with, else None. Per-layer engines: their layers;
    others: their module outside the per-layer stacks (the DiT's `transformer_blocks`, Gemma's `layers`), which
    only the block engines run."""
    if spec.per_layer:
        mods = [m for layer in spec.per_layer for m in layer.modules()]
    else:
        stacks = {"transformer_blocks", "layers"}
        mods = [m for n, m in spec.module.named_modules() if not stacks & set(n.split("."))]
    kinds = {getattr(m, "PRECISION", None) for m in mods}
    return next((p for p in reversed(PRECISION_TABLE) if p in kinds), None)


def stage_precision(plan: Plan, spec: EngineSpec) -> str:
    """The manifest precision of one engine: fp8 / nvfp4 for engines holding such layers, else the dtype."""
    kind = low_bit_kind(spec)
    if kind is not None:
        return kind
    return "bf16" if plan.request.precision in QUANTIZED else plan.request.precision


def quantize_dit(plan: Plan, ckpt: LTXCheckpoint, scratch: Path, log: Log) -> dict[str, Any]:
    """Calibrate the DiT on real pipeline runs (calib_data) with ModelOpt and convert its Linears in place."""
    from fvrt.builder.quant.calibrate import quantize_model, quantize_observed
    from fvrt.builder.quant.nvfp4 import BLOCK as NVFP4_BLOCK
    from fvrt.builder.quant.pipeline_calib import pipeline_dit_amax, pipeline_dit_inputs, read_prompts, spread
    from fvrt.builder.quant.recipe import Precision, QuantRecipe

    req = plan.request
    profile = plan.profiles[0]
    recipe_ = QuantRecipe.named(req.precision)
    exclude = list(recipe_.exclude)
    if recipe_.precision is Precision.NVFP4:  # 16-element blocks: narrower inputs stay bf16 (never in the 22B)
        odd = [n for n in recipe_.select_linears(ckpt.dit) if ckpt.dit.get_submodule(n).in_features % NVFP4_BLOCK]
        exclude += odd
        if odd:
            log(f"calibration: {len(odd)} Linears with an input width not a multiple of {NVFP4_BLOCK} stay bf16")
    prompts: list[str] = []
    images: list[Path] = []
    if req.calib_inputs is not None:
        inputs = list(req.calib_inputs)
        log(f"calibration: {len(inputs)} recorded DiT passes given")
        report = quantize_model(ckpt.dit, recipe_, inputs, method=req.calib_method, exclude=exclude)
        del inputs
    else:
        prompts_file, images = calibration_files(req)
        prompts = spread(read_prompts(prompts_file), req.calib_count)
        tok = calib_tokenizer(plan, scratch)
        log(f"calibration: {len(prompts)} pipeline runs at {profile.name} ({prompts_file}, {len(images)} images)")
        if req.calib_method == "hooks":  # the statistics gathered during the runs: nothing recorded or replayed
            report = quantize_observed(
                ckpt.dit,
                recipe_,
                lambda names: pipeline_dit_amax(
                    ckpt, profile, prompts, tok, names, images=images, device=plan.device, log=log
                ),
                exclude=exclude,
            )
        else:  # ModelOpt calibrates in its own forward loop: the passes are recorded, then replayed through it
            inputs = pipeline_dit_inputs(ckpt, profile, prompts, tok, images=images, device=plan.device, log=log)
            report = quantize_model(ckpt.dit, recipe_, inputs, method=req.calib_method, exclude=exclude)
            del inputs
    log(f"calibration: {len(report.layers)} DiT Linears -> {req.precision} from {report.passes} DiT passes")
    return {
        "recipe": {**recipe_.to_json(), "exclude": exclude},
        "method": report.method,
        "passes": report.passes,
        "prompts": len(prompts),
        "images": len(images),
        "profile": profile.name,
        "layers": len(report.layers),
    }


def quantize_text(plan: Plan, ckpt: LTXCheckpoint, scratch: Path, log: Log) -> dict[str, Any]:
    """--text-precision fp8: calibrate the Gemma decoder layers' Linears on every calibration prompt (tokenized as
    the runtime tokenizes; 1024 tokens each) and convert them in place (embeddings stay bf16). The feature
    extractor and connectors (text_out) stay bf16. DiT calibration, when there is one, ran before this on bf16
    text contexts."""
    from fvrt.builder.quant.calibrate import quantize_model
    from fvrt.builder.quant.pipeline_calib import read_prompts
    from fvrt.builder.quant.recipe import TEXT_ENCODER_DEFAULT_EXCLUDE, QuantRecipe
    from fvrt.runtime.tokenizer import PromptTokenizer

    req = plan.request
    prompts_file, _ = calibration_files(req)
    prompts = read_prompts(prompts_file)
    tokenizer = PromptTokenizer(calib_tokenizer(plan, scratch))
    inputs = []
    for prompt in prompts:
        ids, mask = tokenizer(prompt)
        inputs.append({"input_ids": ids.to(plan.device), "attention_mask": mask.to(plan.device)})
    recipe_ = QuantRecipe.named(req.text_precision)
    exclude = list(TEXT_ENCODER_DEFAULT_EXCLUDE)
    report = quantize_model(
        ckpt.text_encoder,
        recipe_,
        inputs,
        run=lambda m, inp: m(inp["input_ids"], inp["attention_mask"]),
        method=req.calib_method,
        exclude=exclude,
    )
    log(f"text calibration: {len(report.layers)} Gemma Linears -> {req.text_precision} from {len(prompts)} prompts")
    return {
        "recipe": {"precision": req.text_precision, "exclude": exclude},
        "method": report.method,
        "prompts": len(prompts),
        "layers": len(report.layers),
    }
