"""Per-engine ONNX export (opset 23) for the TensorRT family, and its check under ONNX Runtime.

One `EngineSpec` shape key -> one ONNX file with static shapes. The graph carries the precision: weights and
activations keep the dtype the checkpoint was loaded in (fp32 or bf16); the builder never sets precision flags.

Two translations are ours rather than the exporter's defaults (`torch.onnx` "torchlib"), so the graph does not
depend on which torch (2.11 on the GPU machines, 2.13 here) exported it:
- `aten.scaled_dot_product_attention` -> the ONNX `Attention` op (opset 23), which TensorRT >= 10.14 and
  TensorRT-RTX parse into their fused `IAttention` layer. Every stage calls attention through
  `fvrt.builder.models.common.sdpa` (or transformers' SDPA path for Gemma), so this one rule covers them all.
- `aten.rms_norm` -> `RMSNormalization` (opset 23) with a scale of the normalised shape; the default
  translation expands a weightless norm's scale to the full input shape (`ConstantOfShape(Shape(x))`).

The `dit_block` engine takes its weights as graph inputs (`weights_as_inputs`): one engine serves the 48
per-layer weight sets, the runtime binds layer i's device buffers to the weight inputs before each call. Baking
them as initializers would need one engine per layer or a refit per layer and step (refit also cannot build on a
GPU-less machine with TensorRT-RTX; see docs/tensorrt.md). Every other engine keeps its weights as initializers.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvrt.builder.stages.base import EngineSpec

OPSET = 23  # first opset with `Attention` and `RMSNormalization`
EXTERNAL_DATA_BYTES = 1 << 30  # above 1 GiB of weights the initializers go to a side file (protobuf caps at 2 GiB)
# Ops that a bf16 graph computes in fp32 (Cast in, Cast out), because TensorRT-RTX 1.7 cannot build them in bf16.
# ConvTranspose (the vocoder's upsampling): "Could not infer output types for operation: deconv" for every bf16
# transposed convolution tried (grouped or not, any size), while fp16 and fp32 build (measured here).
BF16_FP32_OPS = ("ConvTranspose",)

PRECISIONS: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TORCH_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
    torch.float8_e4m3fn: "float8_e4m3fn",
}


class ExportError(RuntimeError):
    """The exporter produced a graph we cannot hand to TensorRT (dynamic dims, missing ops...)."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, torch dtype name and static shape."""

    name: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class ExportedGraph:
    """An ONNX file of one engine at one shape key, with its I/O as exported.

    inputs: activations first, then (for weights-as-inputs engines) one input per parameter, named as the
    parameter of the per-layer module (`weight_inputs` lists those names in order).
    """

    path: Path
    key: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    weight_inputs: list[str]
    precision: str
    op_types: list[str]
    fp32_islands: list[str]  # op types computed in fp32 inside a bf16 graph (BF16_FP32_OPS that occur)


# --------------------------------------------------------------------------------------------------------------
# custom translations (onnxscript, traced)


def _sdpa_to_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """`aten.scaled_dot_product_attention` -> ONNX `Attention` on 4-D [B, H, T, D] inputs.

    The 4-D form takes the head counts from the shapes (no `q_num_heads` attributes), which also covers
    grouped-query attention (`enable_gqa`); a boolean mask means "attend where True", a float mask is added to
    the logits, exactly as in SDPA.
    """
    from onnxscript import opset23 as op

    if dropout_p != 0.0:
        raise ExportError("attention with dropout cannot be exported (engines are inference-only)")
    if is_causal and attn_mask is not None:
        raise ExportError("attention with both is_causal and attn_mask")
    kwargs: dict[str, Any] = {"is_causal": 1 if is_causal else 0}
    if scale is not None:
        kwargs["scale"] = float(scale)
    # the op declares four outputs (Y, present_key, present_value, qk_matmul_output); only Y is used
    y, _, _, _ = op.Attention(query, key, value, attn_mask, **kwargs)
    return y


def _rms_norm(input: Any, normalized_shape: Sequence[int], weight: Any = None, eps: float | None = None) -> Any:
    """`aten.rms_norm` -> ONNX `RMSNormalization` over the last len(normalized_shape) dims; a weightless norm
    gets a ones scale of the normalised shape."""
    from onnxscript import opset23 as op

    if eps is None:
        eps = float(torch.finfo(torch.float32).eps)  # aten's default when eps is None
    if weight is None:
        one = op.CastLike(op.Constant(value_float=1.0), input)
        weight = op.Expand(one, op.Constant(value_ints=[int(n) for n in normalized_shape]))
    return op.RMSNormalization(input, weight, axis=-len(normalized_shape), epsilon=float(eps))


def _fp8_quantize(x: Any, scale: Any) -> Any:
    """`fvrt::fp8_quantize` -> QuantizeLinear to float8e4m3fn (saturating, zero point 0) of x in float32."""
    import onnx
    from onnxscript import opset23 as op

    zero = onnx.helper.make_tensor("fp8_zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])
    return op.QuantizeLinear(op.Cast(x, to=onnx.TensorProto.FLOAT), scale, op.Constant(value=zero), saturate=1)


def _fp8_dequantize(q: Any, scale: Any) -> Any:
    """`fvrt::fp8_dequantize` -> DequantizeLinear (float8e4m3fn -> float32)."""
    from onnxscript import opset23 as op

    return op.DequantizeLinear(q, scale)


NVFP4_BLOCK = 16
AS_FLOAT4 = "AsFloat4"  # placeholder op (domain "fvrt") marking packed uint8 weights to retype as FLOAT4E2M1


def _register_nvfp4_schemas() -> None:
    """Schemas for the two non-standard ops the NVFP4 translations emit (onnxscript binds calls by schema):
    TensorRT's `trt::TRT_FP4DynamicQuantize` (as ModelOpt exports it) and our `fvrt::AsFloat4` placeholder."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("TRT_FP4DynamicQuantize", "trt"):
        return
    param, attr = OpSchema.FormalParameter, OpSchema.Attribute
    fp4 = OpSchema(
        "TRT_FP4DynamicQuantize",
        "trt",
        1,
        "x -> (FP4 E2M1 values, E4M3 scale per block_size block along axis) under the FP32 global scale",
        inputs=[param("x", "T1"), param("scale", "tensor(float)")],
        outputs=[param("y", "T2"), param("y_scale", "T3")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "input"),
            ("T2", ["tensor(float4e2m1)"], "values"),
            ("T3", ["tensor(float8e4m3fn)"], "block scales"),
        ],
        attributes=[
            attr("axis", OpSchema.AttrType.INT, "quantised axis"),
            attr("block_size", OpSchema.AttrType.INT, "block length"),
            attr("scale_type", OpSchema.AttrType.INT, "element type of y_scale"),
        ],
    )
    mark = OpSchema(
        AS_FLOAT4,
        "fvrt",
        1,
        "placeholder: these packed bytes are FLOAT4E2M1 (removed by retype_float4 after export)",
        inputs=[param("packed", "tensor(uint8)")],
        outputs=[param("values", "tensor(uint8)")],
    )
    onnx.defs.register_schema(fp4)
    onnx.defs.register_schema(mark)


def _nvfp4_act_qdq(x: Any) -> Any:
    """`fvrt::nvfp4_act_qdq` (unit global scale) -> trt::TRT_FP4DynamicQuantize (FP4 values + E4M3 block scales
    computed at run time; its scale input must be a constant) -> DequantizeLinear of the block scales ->
    DequantizeLinear(block 16)."""
    import onnx
    from onnxscript import opset23 as op
    from onnxscript.values import Opset

    _register_nvfp4_schemas()
    one = op.Constant(value_float=1.0)
    xq, xs = Opset("trt", 1).TRT_FP4DynamicQuantize(
        op.Cast(x, to=onnx.TensorProto.FLOAT),
        one,
        axis=-1,
        block_size=NVFP4_BLOCK,
        scale_type=onnx.TensorProto.FLOAT8E4M3FN,
    )
    return op.DequantizeLinear(xq, op.DequantizeLinear(xs, one), axis=-1, block_size=NVFP4_BLOCK)


def _nvfp4_weight_dq(packed: Any, scales: Any, gscale: Any) -> Any:
    """`fvrt::nvfp4_weight_dq` -> FLOAT4E2M1 weights (the packed bytes retyped after export, see
    `retype_float4`) -> DequantizeLinear(E4M3 block scales, FP32 global) -> DequantizeLinear(block 16)."""
    from onnxscript import opset23 as op
    from onnxscript.values import Opset

    _register_nvfp4_schemas()
    w4 = Opset("fvrt", 1).AsFloat4(packed)
    return op.DequantizeLinear(w4, op.DequantizeLinear(scales, gscale), axis=-1, block_size=NVFP4_BLOCK)


def retype_float4(model: Any) -> int:
    """Replace every fvrt::AsFloat4(w) by `w` itself, retyped from UINT8 [out, in / 2] to FLOAT4E2M1 [out, in]
    (the same bytes: element 2i in the low nibble, as ONNX packs FLOAT4E2M1); w is a graph input (per-layer
    weights) or an initializer. Returns how many weights were retyped."""
    import onnx

    g = model.graph
    marks = [n for n in g.node if n.op_type == AS_FLOAT4 and n.domain == "fvrt"]
    tensors = {**{i.name: i for i in g.input}, **{t.name: t for t in g.initializer}}
    for node in marks:
        src, dst = node.input[0], node.output[0]
        t = tensors.get(src)
        if t is None:
            raise ExportError(f"NVFP4 weight '{src}' is neither a graph input nor an initializer")
        if isinstance(t, onnx.TensorProto):
            t.data_type = onnx.TensorProto.FLOAT4E2M1
            t.dims[-1] *= 2
        else:
            t.type.tensor_type.elem_type = onnx.TensorProto.FLOAT4E2M1
            t.type.tensor_type.shape.dim[-1].dim_value *= 2
        for other in g.node:
            for i, name in enumerate(other.input):
                if name == dst:
                    other.input[i] = src
        g.node.remove(node)
    for vi in list(g.value_info):
        if vi.name in {n.output[0] for n in marks}:
            g.value_info.remove(vi)
    if marks and not any(n.domain == "fvrt" for n in g.node):
        keep = [o for o in model.opset_import if o.domain != "fvrt"]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return len(marks)


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The `custom_translation_table` passed to `torch.onnx.export` (see the module docstring)."""
    from fvrt.builder.quant.fp8 import fp8_dequantize_op, fp8_quantize_op  # registers the fvrt:: ops
    from fvrt.builder.quant.nvfp4 import nvfp4_act_qdq_op, nvfp4_weight_dq_op

    aten = torch.ops.aten
    del fp8_dequantize_op, fp8_quantize_op, nvfp4_act_qdq_op, nvfp4_weight_dq_op
    return {
        aten.scaled_dot_product_attention.default: _sdpa_to_attention,
        aten.rms_norm.default: _rms_norm,
        torch.ops.fvrt.fp8_quantize.default: _fp8_quantize,
        torch.ops.fvrt.fp8_dequantize.default: _fp8_dequantize,
        torch.ops.fvrt.nvfp4_act_qdq.default: _nvfp4_act_qdq,
        torch.ops.fvrt.nvfp4_weight_dq.default: _nvfp4_weight_dq,
    }


# --------------------------------------------------------------------------------------------------------------
# export


class WeightsAsInputs(nn.Module):
    """Wrap `module` so that the parameters named `names` are trailing forward inputs instead of weights.

    forward(*activations, *weights): `torch.func.functional_call` of `module` with those parameters replaced.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.inner = module
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> Any:
        n = len(args) - len(self.names)
        params = dict(zip(self.names, args[n:], strict=True))
        return torch.func.functional_call(self.inner, params, args[:n])


def per_layer_parameter_names(spec: EngineSpec) -> list[tuple[str, str]]:
    """For a per-layer engine: (name in `spec.module`, name in `spec.per_layer[i]`) of every parameter.

    The engine module wraps `per_layer[0]` (e.g. `DiTBlockEngine.block`); parameters are matched by identity,
    so the mapping does not depend on how the wrapper names its submodule.
    """
    layer0 = {id(p): n for n, p in spec.per_layer[0].named_parameters()}
    pairs = [(n, layer0[id(p)]) for n, p in spec.module.named_parameters() if id(p) in layer0]
    if len(pairs) != len(layer0):
        raise ExportError(f"{spec.name}: the engine module does not hold the parameters of per_layer[0]")
    return pairs


def module_precision(module: nn.Module) -> str:
    """ "fp32" | "bf16" | "fp16": the floating dtype of the module's parameters (one dtype, or an error). The
    stored-dtype tensors of quantised layers (float8 weights, float32 scales) do not count; their bias does."""
    from fvrt.builder.quant.fp8 import StorageDtypeModule

    dtypes = set()
    for m in module.modules():
        fixed = m._FIXED_DTYPE if isinstance(m, StorageDtypeModule) else ()
        dtypes |= {p.dtype for n, p in m.named_parameters(recurse=False) if p.is_floating_point() and n not in fixed}
    if len(dtypes) != 1 or next(iter(dtypes)) not in PRECISIONS:
        raise ExportError(f"cannot tell the engine precision from parameter dtypes {sorted(map(str, dtypes))}")
    return PRECISIONS[next(iter(dtypes))]


# ONNX TensorProto element types of engine outputs -> torch dtype names (onnx.TensorProto enum values)
_ONNX_DTYPE_NAMES = {
    1: "float32",
    16: "bfloat16",
    10: "float16",
    7: "int64",
    6: "int32",
    9: "bool",
    17: "float8_e4m3fn",
    23: "float4_e2m1",  # packed 2 per byte; the weights file holds the uint8 bytes [out, in / 2]
}


def _onnx_tensor_info(vi: Any) -> TensorInfo:
    """TensorInfo of an ONNX graph input/output (static dims checked by the caller)."""
    t = vi.type.tensor_type
    if t.elem_type not in _ONNX_DTYPE_NAMES:
        raise ExportError(f"tensor '{vi.name}': unsupported ONNX element type {t.elem_type}")
    return TensorInfo(vi.name, _ONNX_DTYPE_NAMES[t.elem_type], [int(d.dim_value) for d in t.shape.dim])


def _dtype_name(t: torch.Tensor) -> str:
    if t.dtype not in TORCH_DTYPE_NAMES:
        raise ExportError(f"unsupported engine tensor dtype {t.dtype}")
    return TORCH_DTYPE_NAMES[t.dtype]


def export_inputs(
    spec: EngineSpec, key: str, weights_as_inputs: bool
) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], list[str]]:
    """(module to export, example inputs, input names, weight input names) for `spec` at shape key `key`."""
    module = spec.module_for(key)
    # fresh storage for every input: the exporter must not see two inputs as one tensor (aliasing makes it
    # turn static dims into symbols)
    inputs = tuple(t.detach().clone() for t in spec.sample_inputs(key))
    names = list(spec.input_names)
    if not weights_as_inputs:
        return module, inputs, names, []
    if not spec.per_layer:
        raise ExportError(f"{spec.name}: weights as inputs needs a per-layer engine")
    pairs = per_layer_parameter_names(spec)
    params = dict(module.named_parameters())
    weights = tuple(params[m].detach() for m, _ in pairs)
    wrapped = WeightsAsInputs(module, [m for m, _ in pairs])
    return wrapped, (*inputs, *weights), [*names, *(n for _, n in pairs)], [n for _, n in pairs]


# Exporter loggers whose warnings are expected here: "torchvision is not installed" (torch.onnx registry) and
# "Skipped deduplication of initializer ... graph input or output" (onnx_ir, for constant outputs of dit_prep).
_NOISY_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Raise the exporter loggers to ERROR for the duration (restored afterwards)."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_qdq(*args: Any, **kwargs: Any) -> Any:
    """`torch.onnx.export` with FP8 layers emitting explicit Q/DQ (`fvrt.builder.quant.fp8.qdq_export`)."""
    from fvrt.builder.quant.fp8 import qdq_export

    with qdq_export():
        return torch.onnx.export(*args, **kwargs)


def export_onnx(
    spec: EngineSpec,
    key: str,
    path: str | Path,
    *,
    weights_as_inputs: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportedGraph:
    """Export engine `spec` at shape key `key` to `path` (opset 23, static shapes) and describe it.

    weights_as_inputs: default True exactly for per-layer engines (`spec.per_layer`, the DiT block).
    """
    import onnx

    path = Path(path)
    if weights_as_inputs is None:
        weights_as_inputs = bool(spec.per_layer)
    module, inputs, input_names, weight_names = export_inputs(spec, key, weights_as_inputs)
    precision = module_precision(spec.module_for(key))
    module.eval()
    chatter = io.StringIO()
    with (
        torch.no_grad(),
        _quiet_loggers(),
        contextlib.redirect_stdout(chatter),
        contextlib.redirect_stderr(chatter),
    ):
        program = _export_qdq(
            module,
            inputs,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=list(spec.output_names),
            custom_translation_table=translation_table(),
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise ExportError(f"{spec.name}[{key}]: torch.onnx.export returned nothing")
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_loggers(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        program.save(path, external_data=nbytes > EXTERNAL_DATA_BYTES)
    # `chatter` holds the exporter's progress lines and torch-internal deprecation warnings; a failed export
    # raises with its own message, so nothing in it is worth forwarding to the build log.

    model = onnx.load(str(path), load_external_data=False)
    islands = upcast_ops(model, BF16_FP32_OPS) if precision == "bf16" else []
    retyped = retype_float4(model)
    if islands or retyped:
        onnx.save(model, str(path))  # external data references (relative locations) stay valid in place
    graph_inputs = [i.name for i in model.graph.input]
    graph_outputs = [o.name for o in model.graph.output]
    if graph_outputs != list(spec.output_names):
        raise ExportError(f"{spec.name}[{key}]: exported outputs {graph_outputs} != {spec.output_names}")
    unused = [n for n in input_names if n not in graph_inputs]
    # NVFP4 weights: uint8 bytes in torch, FLOAT4E2M1 [out, in] in the graph (retype_float4)
    fp4 = {vi.name: vi for vi in model.graph.input if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT4E2M1}
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise ExportError(f"{spec.name}[{key}]: tensor '{vi.name}' has a dynamic dim; engines are static")
    return ExportedGraph(
        path=path,
        key=key,
        inputs=[
            _onnx_tensor_info(fp4[n]) if n in fp4 else TensorInfo(n, _dtype_name(t), list(t.shape))
            for n, t in zip(input_names, inputs, strict=True)
            if n not in unused
        ],
        outputs=[_onnx_tensor_info(vi) for vi in model.graph.output],
        weight_inputs=[n for n in weight_names if n not in unused],
        precision=precision,
        op_types=sorted({n.op_type for n in model.graph.node}),
        fp32_islands=islands,
    )


def upcast_ops(model: Any, op_types: Sequence[str]) -> list[str]:
    """Rewrite every bf16 node of `op_types` in `model` (an onnx ModelProto, changed in place) to run in fp32:
    Cast(FLOAT) on each input, the node writes `<output>_fp32`, Cast(BFLOAT16) restores the original output
    name. Returns the op types rewritten (sorted, unique). Weight inputs get a Cast too; TensorRT folds it."""
    from onnx import TensorProto, helper

    bf16 = _bf16_tensors(model)
    new_nodes = []
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in op_types or not node.input or node.input[0] not in bf16:
            new_nodes.append(node)
            continue
        for j, name in enumerate(node.input):
            if not name:
                continue
            cast = f"{name}__fp32_for_{node.name or node.output[0]}"
            new_nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT, name=f"{cast}_cast"))
            node.input[j] = cast
        restore = []
        for j, name in enumerate(node.output):
            if not name:
                continue
            node.output[j] = f"{name}__fp32"
            restore.append(
                helper.make_node("Cast", [node.output[j]], [name], to=TensorProto.BFLOAT16, name=f"{name}_to_bf16")
            )
        new_nodes.extend([node, *restore])
        done.add(node.op_type)
    if done:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    return sorted(done)


def _bf16_tensors(model: Any) -> set[str]:
    """Names of the bf16 tensors of `model`'s main graph (inputs, initializers, typed intermediate values)."""
    from onnx import TensorProto

    names = {i.name for i in model.graph.initializer if i.data_type == TensorProto.BFLOAT16}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            names.add(vi.name)
    return names


# --------------------------------------------------------------------------------------------------------------
# ONNX Runtime check


def _ort_feed(ort: Any, t: torch.Tensor) -> Any:
    """A numpy array, or for float8 tensors (no numpy dtype) an OrtValue typed FLOAT8E4M3FN over their bytes."""
    t = t.detach().cpu()
    if t.dtype == torch.float8_e4m3fn:
        from onnx import TensorProto

        raw = t.contiguous().view(torch.uint8).numpy()
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, TensorProto.FLOAT8E4M3FN)
    return t.numpy()


def run_onnxruntime(path: str | Path, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the ONNX file on CPU with ONNX Runtime; feeds that the graph does not take are dropped (an input the
    exporter pruned because the graph ignores it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    taken = {i.name for i in session.get_inputs()}
    arrays = {n: _ort_feed(ort, t) for n, t in feeds.items() if n in taken}
    names = [o.name for o in session.get_outputs()]
    return {n: torch.from_numpy(a) for n, a in zip(names, session.run(names, arrays), strict=True)}


def onnxruntime_parity(spec: EngineSpec, key: str, graph: ExportedGraph) -> dict[str, float]:
    """Relative error (||ort - eager|| / ||eager||, float64) per output of the ONNX graph vs eager PyTorch on
    fresh sample inputs (not the export example). fp32 graphs only: ONNX Runtime's CPU kernels are fp32."""
    if graph.precision != "fp32":
        raise ExportError(f"ONNX Runtime parity is checked on fp32 graphs; {spec.name} is {graph.precision}")
    module, inputs, names, _ = export_inputs(spec, key, bool(graph.weight_inputs))
    with torch.no_grad():
        ref = module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = run_onnxruntime(graph.path, dict(zip(names, inputs, strict=True)))
    errors = {}
    for name, r in zip(spec.output_names, ref, strict=True):
        a, e = got[name].double(), r.double()
        if tuple(a.shape) != tuple(e.shape):
            raise ExportError(f"{spec.name}[{key}] output {name}: ORT shape {tuple(a.shape)} != {tuple(e.shape)}")
        errors[name] = float((a - e).norm() / e.norm().clamp_min(1e-30))
    return errors
