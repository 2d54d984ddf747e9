"""TensorRT-RTX accepts and builds every engine graph on this GPU-less machine (CPU-only AOT for SM89 and
SM120), fp32 and bf16; the backend writes plans, per-layer weights and a complete `StageEntry`.

The plans cannot be executed or even validated here (`Runtime.get_engine_validity` needs a GPU driver), and
TensorRT-RTX 1.7 refuses to run on the H100/H200 we have (compute capability 9.0): see docs/tensorrt.md.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from fvrt.builder.backends import get_backend
from fvrt.builder.backends import tensorrt as TB
from fvrt.builder.checkpoint import ModelVersion
from fvrt.runtime.manifest import sha256_file

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fvrt[trt]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'fvrt[trt]')")
RTX = get_backend("tensorrt-rtx")
RTX_MISSING = RTX.available()
needs_rtx = pytest.mark.skipif(RTX_MISSING is not None, reason=f"TensorRT-RTX wheel unavailable: {RTX_MISSING}")

from onnx_graphs import ATTENTION_ENGINES, ENGINES, exported, tiny_specs  # noqa: E402

from fvrt.builder.backends import onnx_export as OX  # noqa: E402
from fvrt.builder.models.common import Attention  # noqa: E402

TARGETS = ("8.9", "12.0")  # issue 3: at least SM89 and SM120


def test_parse_compute_capabilities() -> None:
    assert TB.parse_compute_capabilities("SM89,sm_120, 8.6") == ("8.9", "12.0", "8.6")
    assert TB.parse_compute_capabilities(["89", "8.9", "121"]) == ("8.9", "12.1")
    with pytest.raises(ValueError, match=r"cannot target compute capability 9\.0"):
        TB.parse_compute_capabilities("SM90")
    with pytest.raises(ValueError, match="cannot read"):
        TB.parse_compute_capabilities("ampere")


def test_unavailable_backend_gives_one_line_reason() -> None:
    full = get_backend("tensorrt")
    reason = full.available()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert reason is not None and "\n" not in reason and "'tensorrt' cannot be imported" in reason
    with pytest.raises(ValueError, match="unknown TensorRT flavour"):
        TB.backend("tensorrt-llm")
    with pytest.raises(ValueError, match="--attention cudnn: TensorRT backends take one of default, decomposable"):
        TB.backend("tensorrt-rtx", attention="cudnn")


@functools.cache
def _plan(version: ModelVersion, precision: str, engine: str) -> TB.PlanResult:
    graph = exported(version, precision).graphs[engine]
    backend = TB.backend("tensorrt-rtx", target_ccs=TARGETS, attention="decomposable")
    return backend.build_plan(graph.path, precision=precision, what=engine)


@needs_rtx
@pytest.mark.parametrize("engine", ENGINES)
def test_rtx_builds_every_engine_fp32(version: ModelVersion, engine: str) -> None:
    built = _plan(version, "fp32", engine)
    assert len(built.plan) > 10_000
    if engine in ATTENTION_ENGINES:
        # fp32 has no fused attention kernel: IAttention layers present and marked decomposable
        assert built.attention_layers > 0 and built.attention_decomposable


@needs_rtx
@pytest.mark.parametrize("engine", ENGINES)
def test_rtx_builds_every_engine_bf16(version: ModelVersion, engine: str) -> None:
    """bf16 precision comes from the graph alone (bf16 weights and activations; no builder flag exists)."""
    ex = exported(version, "bf16")
    assert ex.graphs[engine].precision == "bf16"
    built = _plan(version, "bf16", engine)
    assert len(built.plan) > 10_000
    if engine == "audio_decoder":
        assert ex.graphs[engine].fp32_islands == ["ConvTranspose"]


class _AttentionBlock(nn.Module):
    def __init__(self, heads: int, dim_head: int) -> None:
        super().__init__()
        self.attn1 = Attention(heads * dim_head, None, heads=heads, dim_head=dim_head, gated=True)
        self.attn2 = Attention(heads * dim_head, 96, heads=heads, dim_head=dim_head, gated=True)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.attn2(self.attn1(x), ctx)


@needs_rtx
@pytest.mark.parametrize("dim_head", [64, 128])
def test_rtx_bf16_attention_uses_fused_kernel(tmp_path: Path, dim_head: int) -> None:
    """At real head sizes (video 128, audio 64) bf16 attention builds with IAttention NOT decomposable, i.e.
    TensorRT-RTX found a dedicated fused kernel for SM89 and SM120 (the tiny engines' head_dim 8 has none)."""
    torch.manual_seed(0)
    module = _AttentionBlock(4, dim_head).to(torch.bfloat16).eval()
    x = torch.randn(1, 256, 4 * dim_head, dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (x, ctx),
            dynamo=True,
            opset_version=OX.OPSET,
            custom_translation_table=OX.translation_table(),
            verbose=False,
        )
    path = tmp_path / "attn.onnx"
    program.save(path)
    strict = TB.backend("tensorrt-rtx", target_ccs=TARGETS, attention="default")
    built = strict.build_plan(path, precision="bf16", what="attention")
    assert built.attention_layers == 2 and not built.attention_decomposable
    assert len(built.plan) > 10_000


@needs_rtx
def test_rtx_small_head_attention_is_decomposed_and_logged(tmp_path: Path) -> None:
    """The tiny models' head size 8 has no fused kernel: bf16 attention at --attention default is decomposed (not
    a failed build) and the build log says why."""
    torch.manual_seed(0)
    module = _AttentionBlock(2, 8).to(torch.bfloat16).eval()
    x, ctx = torch.randn(1, 64, 16, dtype=torch.bfloat16), torch.randn(1, 77, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (x, ctx), dynamo=True, opset_version=OX.OPSET, custom_translation_table=OX.translation_table(),
            verbose=False,
        )  # fmt: skip
    path = tmp_path / "attn.onnx"
    program.save(path)
    lines: list[str] = []
    rtx = TB.backend("tensorrt-rtx", target_ccs=TARGETS)
    built = rtx.build_plan(path, precision="bf16", what="attention", log=lines.append)
    assert built.attention_layers == 2 and built.attention_decomposable and len(built.plan) > 10_000
    assert any("head size 8 is below the fused kernels' minimum (16)" in line for line in lines), lines


@needs_rtx
def test_backend_build_writes_stage_entry(tmp_path: Path) -> None:
    """backend.build(): one plan per shape key, sha256 recorded, per-layer weights apart, I/O per key."""
    specs = tiny_specs(ModelVersion.LTX23, "fp32")
    spec = specs["dit_block"]
    backend = TB.backend("tensorrt-rtx", target_ccs=("SM89", "SM120"))
    logs: list[str] = []
    entry = backend.build(spec, tmp_path, precision="fp32", log=logs.append)

    assert entry.backend == "tensorrt-rtx" and entry.precision == "fp32" and entry.name == "dit_block"
    files = entry.extra["files"]
    assert set(files) == set(spec.shape_keys) == {"tiny/s1", "tiny/s2"}
    for info in files.values():
        path = tmp_path / info["file"]
        assert path.suffix == ".plan" and path.stat().st_size == info["bytes"] > 0
        assert sha256_file(path) == info["sha256"]
    assert entry.file == files["tiny/s1"]["file"] and entry.sha256 == files["tiny/s1"]["sha256"]
    assert entry.files == {info["file"]: info["sha256"] for info in files.values()}
    assert entry.extra["compute_capabilities"] == ["8.9", "12.0"]
    assert entry.extra["tensorrt_module"] == "tensorrt_rtx" and entry.extra["onnx_opset"] == 23
    assert entry.extra["attention"]["layers"] > 0
    # activations only in `inputs`, with a shape per key; the weights are inputs bound from the weights file
    names = [t.name for t in entry.inputs]
    assert names == spec.input_names
    assert all(set(t.shapes) == {"tiny/s1", "tiny/s2"} for t in entry.inputs + entry.outputs)
    assert [t.name for t in entry.outputs] == spec.output_names
    with torch.no_grad():
        for key in spec.shape_keys:
            eager = spec.module_for(key)(*spec.sample_inputs(key))
            for t, e in zip(entry.outputs, eager, strict=True):
                assert t.shapes[key] == list(e.shape) and t.dtype == str(e.dtype).removeprefix("torch."), t.name
    from safetensors import safe_open

    assert entry.weights is not None and sha256_file(tmp_path / entry.weights) == entry.weights_sha256
    weight_names = [w["name"] for w in entry.extra["weight_inputs"]]
    with safe_open(str(tmp_path / entry.weights), "pt") as f:
        keys = set(f.keys())
        assert keys == {f"layers.{i}.{n}" for i in range(len(spec.per_layer)) for n in weight_names}
        last = len(spec.per_layer) - 1
        n0 = weight_names[0]
        assert torch.equal(f.get_tensor(f"layers.{last}.{n0}"), dict(spec.per_layer[last].named_parameters())[n0])
    assert not any(p.name.startswith(".onnx") for p in tmp_path.iterdir()), "scratch ONNX left behind"
    assert any("plan" in line for line in logs)


@needs_rtx
def test_backend_refuses_precision_mismatch(tmp_path: Path) -> None:
    spec = tiny_specs(ModelVersion.LTX23, "fp32")["upsampler"]
    with pytest.raises(ValueError, match="--precision bf16 but the loaded weights are fp32"):
        TB.backend("tensorrt-rtx").build(spec, tmp_path, precision="bf16")
    assert not any(tmp_path.iterdir())
