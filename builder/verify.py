"""Engine vs eager on fresh sample inputs: the build-time self-check (`fvrt-build --verify`) and the GPU scripts.

Every shape key of the engine runs on `spec.sample_inputs(key)`; per-layer engines (DiT blocks, Gemma layers)
run their first and last weight set against the wrapper module evaluated with that layer's weights. The result
is the relative L2 error of every output (1.0 / 0.0 for integer outputs that differ / match), over the rows that
carry meaning where the spec says which (`EngineSpec.valid_rows`; the all-rows error is kept as information)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fvrt.builder.stages.base import EngineSpec
from fvrt.runtime.manifest import StageEntry

INFO = "info: "  # prefix of entries that are reported but not checked
FP32_REFERENCED = ("video_encoder", "upsampler", "audio_decoder", "text_out")  # small enough for an fp32 copy


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (integers: 0.0 if equal else 1.0)."""
    if not actual.is_floating_point():
        return float(not torch.equal(actual, expected))
    a, b = actual.detach().double(), expected.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def eager_outputs(spec: EngineSpec, key: str, inputs: tuple[torch.Tensor, ...], layer: int | None) -> tuple:
    """The eager module's outputs; for per-layer engines with layer `layer`'s weights (the engine module wraps
    `per_layer[0]` as `.block`, so its parameters are renamed `block.<name>`)."""
    with torch.no_grad():
        if layer is None:
            out = spec.module_for(key)(*inputs)
        else:
            weights = {f"block.{n}": t for n, t in spec.per_layer[layer].named_parameters()}
            out = torch.func.functional_call(spec.module, weights, inputs, strict=False)
    return out if isinstance(out, tuple) else (out,)


def check_engine(spec: EngineSpec, engine: Any) -> dict[str, float]:
    """Relative error of every output, keyed "<shape key>[ L<layer>] <output name>"; `engine.run(key, *inputs,
    layer=)` is a loaded engine (e.g. `fvrt.runtime.backends.aoti.AOTIEngine`)."""
    errs: dict[str, float] = {}
    for key in spec.shape_keys:
        inputs = tuple(t.clone() for t in spec.sample_inputs(key))  # no two inputs share memory
        layers: list[int | None] = sorted({0, len(spec.per_layer) - 1}) if spec.per_layer else [None]
        for layer in layers:
            want = eager_outputs(spec, key, inputs, layer)
            with torch.no_grad():
                got = engine.run(key, *inputs, layer=layer)
            rows = spec.valid_rows(inputs) if spec.valid_rows is not None else None
            for name, g, w in zip(spec.output_names, got, want, strict=True):
                tag = f"{key}{'' if layer is None else f' L{layer}'} {name}"
                if rows is None:
                    errs[tag] = rel_err(g, w)
                else:  # the meaningful rows are the check; all rows are reported for information
                    errs[tag] = rel_err(g[:, rows], w[:, rows])
                    errs[f"{INFO}{tag} incl. rows without meaning"] = rel_err(g, w)
    return errs


def check_against_fp32(
    spec: EngineSpec, engine: Any, names: Sequence[str] | None = None, on: torch.device | None = None
) -> dict[str, dict[str, float]]:
    """bf16 rounding is noise of the order of the 1e-2 bar: the engine and eager bf16, both measured against the
    module evaluated with fp32 copies of its tensors on the same inputs. The engine computes as well as eager
    when its error is no larger. `names`: the tensors the engine reads (its weight inputs); only those are copied
    (a wrapper such as text_out's holds all of Gemma but reads its final norm). `on`: where the fp32 reference
    runs (default: where the tensors are; "cpu" when the GPU has no room). For the stages in `FP32_REFERENCED`."""
    tensors = {**dict(spec.module.named_parameters()), **dict(spec.module.named_buffers())}
    if names is not None:
        tensors = {n: tensors[n] for n in names if n in tensors}
    fp32 = {n: (t.float() if t.is_floating_point() else t).to(on or t.device) for n, t in tensors.items()}
    row: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for key in spec.shape_keys:
            inputs = tuple(t.clone() for t in spec.sample_inputs(key))
            up = tuple((t.float() if t.is_floating_point() else t).to(on or t.device) for t in inputs)
            want = torch.func.functional_call(spec.module, fp32, up, strict=False)
            eager = spec.module_for(key)(*inputs)
            got = engine.run(key, *inputs)
            want, eager = (x if isinstance(x, tuple) else (x,) for x in (want, eager))
            for name, g, e, w in zip(spec.output_names, got, eager, want, strict=True):
                w = w.to(g.device)
                row[f"{key} {name}"] = {"engine_vs_fp32": rel_err(g, w), "eager_bf16_vs_fp32": rel_err(e, w)}
    del fp32
    return row


def fp32_maxima(row: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(engine, eager bf16) largest error against fp32 of a `check_against_fp32` result."""
    return max(v["engine_vs_fp32"] for v in row.values()), max(v["eager_bf16_vs_fp32"] for v in row.values())


def worst(errs: dict[str, float]) -> float:
    """The largest error of a `check_engine` result (informational entries left out)."""
    return max(v for k, v in errs.items() if not k.startswith(INFO))


__all__ = [
    "FP32_REFERENCED",
    "INFO",
    "check_against_fp32",
    "check_engine",
    "eager_outputs",
    "fp32_maxima",
    "rel_err",
    "worst",
]


def verify_built(
    spec: EngineSpec, tmp: Path, entry: StageEntry, device: torch.device, log: Callable[[str], None]
) -> dict[str, Any]:
    """--verify: the new torch-aot engine in `tmp` (bound to the in-memory weights) against eager on fresh sample
    inputs; the manifest's `verify` record."""
    from fvrt.builder.backends.aoti import weight_file_tensors
    from fvrt.runtime.backends.aoti import AOTIEngine

    t = time.perf_counter()
    layout = entry.extra.get("conv_layout", "ncdhw")
    engine = AOTIEngine(tmp, entry, device, tensors=weight_file_tensors(spec, entry.weight_names, layout))
    errs = check_engine(spec, engine)
    top = worst(errs)
    log(f"{spec.name}: verified against eager, max rel err {top:.2e} ({time.perf_counter() - t:.1f} s)")
    out: dict[str, Any] = {"max_rel_err": top, "rel_err": errs}
    if spec.name in FP32_REFERENCED and next(spec.module.parameters()).dtype != torch.float32:
        try:
            try:
                row = check_against_fp32(spec, engine, entry.weight_names)
            except torch.OutOfMemoryError:  # e.g. text_out next to the 12B Gemma and the DiT: reference on the CPU
                torch.cuda.empty_cache()
                log(f"{spec.name}: no room on the GPU for the fp32 reference, computing it on the CPU")
                row = check_against_fp32(spec, engine, entry.weight_names, on=torch.device("cpu"))
        except (torch.OutOfMemoryError, RuntimeError) as e:  # information only: never fail a build over it
            log(f"{spec.name}: no fp32 reference ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        else:
            out["vs_fp32"] = row
            e_max, b_max = fp32_maxima(row)
            log(f"{spec.name}: against fp32 tensors: engine {e_max:.2e}, eager {b_max:.2e}")
    del engine
    return out
