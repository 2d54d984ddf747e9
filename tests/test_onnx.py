"""ONNX export of every engine (opset 23, `Attention` / `RMSNormalization`), checked against eager PyTorch with
ONNX Runtime on CPU at tiny size, fp32, both model versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close
from torch import nn

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fvrt[trt]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fvrt[trt]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'fvrt[trt]')")

from onnx_graphs import ATTENTION_ENGINES, ENGINES, exported  # noqa: E402

from fvrt.builder.backends import onnx_export as OX  # noqa: E402
from fvrt.builder.checkpoint import ModelVersion  # noqa: E402
from fvrt.builder.models.common import Attention  # noqa: E402

ORT_TOL = 1e-4  # issue 3: exported graph vs eager fp32, relative error per output


@pytest.mark.parametrize("engine", ENGINES)
def test_onnx_matches_eager(version: ModelVersion, engine: str) -> None:
    # Precondition: the engine exported at opset 23 with static shapes
    ex = exported(version, "fp32")
    graph, spec = ex.graphs[engine], ex.specs[engine]
    model = onnx.load(str(graph.path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == OX.OPSET
    # Under test: ONNX Runtime (CPU) on fresh random inputs vs eager PyTorch
    errors = OX.onnxruntime_parity(spec, graph.key, graph)
    # Postcondition
    assert set(errors) == set(spec.output_names)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= ORT_TOL, f"{engine} output {worst}: relative error {errors[worst]:.3e} > {ORT_TOL}"


@pytest.mark.parametrize("engine", ENGINES)
def test_attention_and_rmsnorm_are_onnx_ops(version: ModelVersion, engine: str) -> None:
    graph = exported(version, "fp32").graphs[engine]
    ops = set(graph.op_types)
    # attention is never decomposed into MatMul-Softmax-MatMul; TensorRT maps `Attention` to IAttention
    assert "Softmax" not in ops, engine
    if engine in ATTENTION_ENGINES:
        assert {"Attention", "RMSNormalization"} <= ops, (engine, sorted(ops))


def test_dit_block_weights_are_inputs(version: ModelVersion) -> None:
    """One graph serves every layer: feeding layer k's weights reproduces eager layer k."""
    ex = exported(version, "fp32")
    graph, spec = ex.graphs["dit_block"], ex.specs["dit_block"]
    layer_names = dict(spec.per_layer[0].named_parameters()).keys()
    assert graph.weight_inputs and set(graph.weight_inputs) <= set(layer_names)
    assert len(spec.per_layer) > 1
    k = len(spec.per_layer) - 1
    acts = spec.sample_inputs(graph.key)
    layer = dict(spec.per_layer[k].named_parameters())
    feeds = dict(zip(spec.input_names, acts, strict=True))
    feeds.update({n: layer[n].detach() for n in graph.weight_inputs})
    got = OX.run_onnxruntime(graph.path, feeds)
    with torch.no_grad():
        ref = torch.func.functional_call(
            spec.module.block, layer, (*acts[:4], *spec.module.fields_to_streams(acts[4:]))
        )
    for name, r in zip(spec.output_names, ref, strict=True):
        assert_rel_close(got[name], r, ORT_TOL, f"dit_block layer {k} {name}")


class _AttentionProbe(nn.Module):
    """Attention variants the stages use: fvrt `Attention` (QK RMSNorm, RoPE-free here, per-head gate), and raw
    SDPA with a boolean mask and with grouped-query heads (Gemma)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention(32, 24, heads=4, dim_head=16, gated=True)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn(x, ctx)
        q = x.view(1, 12, 4, 8).transpose(1, 2)  # [1, 4, 12, 8]
        kv = ctx[..., :16].reshape(1, 20, 2, 8).transpose(1, 2)  # [1, 2, 20, 8]: 2 kv heads
        b = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, enable_gqa=True, scale=0.3)
        return a, b


def test_attention_translation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _AttentionProbe().eval()
    x, ctx = torch.randn(1, 12, 32), torch.randn(1, 20, 24)
    mask = torch.rand(1, 1, 12, 20) > 0.3
    mask[..., 0] = True  # every query attends somewhere
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (x, ctx, mask),
            dynamo=True,
            opset_version=OX.OPSET,
            custom_translation_table=OX.translation_table(),
            verbose=False,
        )
    path = tmp_path / "attn.onnx"
    program.save(path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Attention") == 2 and ops.count("RMSNormalization") == 2 and "Softmax" not in ops
    x2, ctx2 = torch.randn(1, 12, 32), torch.randn(1, 20, 24)
    got = OX.run_onnxruntime(path, {"x": x2, "ctx": ctx2, "mask": mask})
    with torch.no_grad():
        ref = module(x2, ctx2, mask)
    for (name, out), r in zip(got.items(), ref, strict=True):
        assert_rel_close(out, r, 1e-5, name)


def test_upcast_ops_runs_convtranspose_in_fp32(tmp_path: Path) -> None:
    """The bf16 -> fp32 island rewrite (TensorRT-RTX has no bf16 deconvolution) keeps the graph's meaning."""

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 1, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.conv_transpose1d(x.to(torch.bfloat16), self.w.to(torch.bfloat16), stride=2, groups=6)
            return y.float()

    torch.manual_seed(0)
    module = Up().eval()
    x = torch.randn(1, 6, 10)
    with torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=OX.OPSET, verbose=False)
    model = program.model_proto
    assert OX.upcast_ops(model, OX.BF16_FP32_OPS) == ["ConvTranspose"]
    path = tmp_path / "up.onnx"
    onnx.save(model, str(path))
    ops = [n.op_type for n in model.graph.node]
    i = ops.index("ConvTranspose")
    assert ops[i - 1] == "Cast" and ops[i + 1] == "Cast"
    got = OX.run_onnxruntime(path, {"x": x})
    with torch.no_grad():
        xb, wb = x.to(torch.bfloat16).float(), module.w.to(torch.bfloat16).float()
        ref = F.conv_transpose1d(xb, wb, stride=2, groups=6).to(torch.bfloat16).float()
    assert torch.equal(next(iter(got.values())), ref)
