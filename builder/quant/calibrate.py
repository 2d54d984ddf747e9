"""Post-training calibration (max of |activation| per Linear input) and conversion to FP8 / NVFP4 layers.

    inputs (an iterable of forward-argument dicts, iterated once)
      -> amax of every selected Linear's input over all of them      (ModelOpt max calibration, or hooks)
      -> FP8Linear (input_scale = amax / 448, weight per tensor)      or NVFP4Linear (input global = amax / 2688)

Two calibrators give the same numbers (tested): `method="modelopt"` runs `mtq.quantize(model, cfg, forward_loop)`
with an E4M3 per-tensor config restricted to the recipe's layers and reads the calibrated `amax` of each input
quantizer; `method="hooks"` records the same maximum with forward pre-hooks (no ModelOpt needed). ModelOpt works
on a structural copy of the model that shares every parameter (no weight is copied), so the model itself is
never wrapped by ModelOpt. Max calibration runs the unquantised forward, so both see the same activations.

NVFP4 uses the same per-tensor amax (its activation global scale); its block scales are dynamic.

DiT calibration inputs are `LTXDiT.forward` keyword dicts, recorded from real pipeline runs over the calibration
prompts (`fvrt.builder.quant.pipeline_calib`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fvrt.builder.quant.fp8 import FP8Linear
from fvrt.builder.quant.nvfp4 import BLOCK as NVFP4_BLOCK
from fvrt.builder.quant.nvfp4 import NVFP4Linear
from fvrt.builder.quant.recipe import Precision, QuantRecipe

Inputs = Mapping[str, Any]
Runner = Callable[[nn.Module, Inputs], Any]


def run_dit(model: nn.Module, inputs: Inputs) -> Any:
    """One DiT pass on a dict of `LTXDiT.forward` keyword arguments."""
    return model(**inputs)


# ---- amax collection ------------------------------------------------------------------------------------------


def observe_amax(amax: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """Fold max |x| (float32 []) into `amax[name]`: the statistic both calibrators collect."""
    a = x.detach().abs().amax().float()
    amax[name] = a if name not in amax else torch.maximum(amax[name], a)


def collect_amax_hooks(
    model: nn.Module, names: Sequence[str], inputs: Iterable[Inputs], run: Runner = run_dit
) -> dict[str, torch.Tensor]:
    """max |input| (float32 []) of each named module over all passes, via forward pre-hooks."""
    amax: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe_amax(amax, name, args[0])

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for inp in inputs:
                run(model, inp)
    finally:
        for h in handles:
            h.remove()
    _check_seen(names, amax)
    return amax


def _check_seen(names: Sequence[str], amax: Mapping[str, torch.Tensor]) -> None:
    unseen = [n for n in names if n not in amax]
    if unseen:
        raise ValueError(f"calibration never ran layer '{unseen[0]}' ({len(unseen)} layers unseen): no inputs?")


def _shadow(model: nn.Module) -> nn.Module:
    """A structural copy of `model` sharing every parameter and buffer (ModelOpt mutates module classes)."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


FP8_E4M3_QUANTIZER = {"num_bits": (4, 3), "axis": None}
"""ModelOpt per-tensor E4M3 quantizer (as `mtq.FP8_DEFAULT_CFG`), max calibration."""


def modelopt_config(recipe: QuantRecipe, exclude: Sequence[str] | None = None) -> dict[str, Any]:
    """An `mtq.quantize` config quantising the Linear inputs and weights that `recipe` selects: everything off,
    then the include globs on (Linear parents only), then the exclude globs off. A quantizer is named
    `<module>.input_quantizer`; appending that literal suffix to a glob keeps its meaning."""
    exc = recipe.exclude if exclude is None else tuple(exclude)
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for g in recipe.include:
        for q in ("input_quantizer", "weight_quantizer"):
            entries.append({"quantizer_name": f"{g}.{q}", "parent_class": "nn.Linear", "cfg": dict(FP8_E4M3_QUANTIZER)})
    for g in exc:
        for q in ("input_quantizer", "weight_quantizer"):
            entries.append({"quantizer_name": f"{g}.{q}", "enable": False})
    return {"quant_cfg": entries, "algorithm": "max"}


def collect_amax_modelopt(
    model: nn.Module,
    recipe: QuantRecipe,
    inputs: Iterable[Inputs],
    run: Runner = run_dit,
    *,
    exclude: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ModelOpt max calibration of the layers `recipe` selects: (input amax, weight amax) per layer name."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ImportError(
            "method='modelopt' needs nvidia-modelopt: pip install --no-deps nvidia-modelopt==0.47.0 "
            "requests omegaconf pulp (see docs/quantization.md), or use method='hooks'"
        ) from e
    names = recipe.select_linears(model, exclude=exclude)
    shadow = _shadow(model)
    items = list(inputs) if not isinstance(inputs, (list, tuple)) else inputs

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for inp in items:
                run(m, inp)

    mtq.quantize(shadow, modelopt_config(recipe, exclude), forward_loop=forward_loop)
    enabled = {
        n.rsplit(".", 1)[0]
        for n, m in shadow.named_modules()
        if n.endswith(".input_quantizer") and getattr(m, "is_enabled", False)
    }
    if enabled != set(names):
        extra = sorted(enabled ^ set(names))
        raise RuntimeError(f"ModelOpt quantised a different layer set than the recipe selects (first: {extra[0]})")
    in_amax: dict[str, torch.Tensor] = {}
    w_amax: dict[str, torch.Tensor] = {}
    for n in names:
        m = shadow.get_submodule(n)
        if m.input_quantizer.amax is not None:
            in_amax[n] = m.input_quantizer.amax.detach().float().reshape(())
        w_amax[n] = m.weight_quantizer.amax.detach().float().reshape(())
    _check_seen(names, in_amax)
    return in_amax, w_amax


# ---- conversion -----------------------------------------------------------------------------------------------


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` in `model`."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def check_layers(model: nn.Module, names: Sequence[str], precision: Precision) -> None:
    """Refuse layers the format cannot hold (NVFP4: in_features must be a multiple of its 16-element block)."""
    if precision is Precision.NVFP4:
        for name in names:
            k = model.get_submodule(name).in_features
            if k % NVFP4_BLOCK:
                raise ValueError(f"NVFP4 layer '{name}' has in_features={k}, not a multiple of {NVFP4_BLOCK}")


def convert_linears(model: nn.Module, input_amax: Mapping[str, torch.Tensor], precision: Precision) -> None:
    """Replace each named `nn.Linear` by its FP8 / NVFP4 layer, in place (weights are quantised here).
    NVFP4 needs in_features divisible by 16 (one block scale per 16 inputs): a selected layer that is not is an
    error naming it (exclude it in the recipe), never silently left unquantised."""
    check_layers(model, list(input_amax), precision)
    for name, amax in input_amax.items():
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"'{name}' is {type(linear).__name__}, not nn.Linear")
        if precision is Precision.FP8:
            new: nn.Module = FP8Linear.from_linear(linear, amax)
        elif precision is Precision.NVFP4:
            new = NVFP4Linear.from_linear(linear, amax)
        else:
            raise ValueError(f"convert_linears: nothing to convert to for {precision.value}")
        replace_module(model, name, new.train(linear.training))


@dataclass
class QuantReport:
    """What a calibration did: the quantised layers and their calibrated input amax."""

    precision: Precision
    method: str
    layers: list[str]
    input_amax: dict[str, float] = field(default_factory=dict)
    passes: int = 0


def quantize_model(
    model: nn.Module,
    recipe: QuantRecipe,
    inputs: Iterable[Inputs],
    *,
    run: Runner = run_dit,
    method: str = "modelopt",
    exclude: Sequence[str] | None = None,
) -> QuantReport:
    """Calibrate `model` on `inputs` and convert the recipe's Linear layers in place.

    method: "modelopt" (nvidia-modelopt max calibration) or "hooks" (the same statistic without ModelOpt).
    exclude: override of `recipe.exclude` (e.g. the text encoder's list). bf16 recipes change nothing.
    """
    if recipe.precision is Precision.BF16:
        return QuantReport(recipe.precision, method, [])
    items = list(inputs)
    names = recipe.select_linears(model, exclude=exclude)
    check_layers(model, names, recipe.precision)
    if method == "modelopt":
        amax, _ = collect_amax_modelopt(model, recipe, items, run, exclude=exclude)
    elif method == "hooks":
        amax = collect_amax_hooks(model, names, items, run)
    else:
        raise ValueError(f"calibration method must be 'modelopt' or 'hooks', got {method!r}")
    return _convert(model, recipe, names, amax, method, len(items))


def quantize_observed(
    model: nn.Module,
    recipe: QuantRecipe,
    observe: Callable[[Sequence[str]], tuple[Mapping[str, torch.Tensor], int]],
    *,
    exclude: Sequence[str] | None = None,
) -> QuantReport:
    """`quantize_model` with method "hooks" for statistics collected while something else runs the model:
    `observe(names)` returns the max |input| of each named Linear and how many passes it saw (DiT calibration:
    `pipeline_calib.pipeline_dit_amax`, during the calibration pipeline runs, with no pass recorded or replayed)."""
    if recipe.precision is Precision.BF16:
        return QuantReport(recipe.precision, "hooks", [])
    names = recipe.select_linears(model, exclude=exclude)
    check_layers(model, names, recipe.precision)
    amax, passes = observe(names)
    _check_seen(names, amax)
    return _convert(model, recipe, names, amax, "hooks", passes)


def _convert(
    model: nn.Module,
    recipe: QuantRecipe,
    names: Sequence[str],
    amax: Mapping[str, torch.Tensor],
    method: str,
    passes: int,
) -> QuantReport:
    ordered = {n: amax[n] for n in names}  # module order
    convert_linears(model, ordered, recipe.precision)
    return QuantReport(recipe.precision, method, list(names), {k: float(v) for k, v in ordered.items()}, passes)


__all__ = [
    "QuantReport",
    "collect_amax_hooks",
    "collect_amax_modelopt",
    "convert_linears",
    "modelopt_config",
    "observe_amax",
    "quantize_model",
    "quantize_observed",
    "replace_module",
    "run_dit",
]
