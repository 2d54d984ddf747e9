"""Quantisation core: FP8Linear (emulated and torch._scaled_mm), calibration (hooks and ModelOpt give the same
scales), recipes with the official exclusion list, torch.export of a quantised block, official-format FP8 files
(checked against ltx-core's own fp8-scaled-mm loader), NVFP4 numerics (bit-exact against ModelOpt's packing).

All on CPU in float32. Measured numbers are printed with `-s` (`pytest -s tests/test_quant.py`).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CalibShape, assert_rel_close, random_dit_inputs, rel_error, two_stage_passes
from torch import nn

from fvrt import load_checkpoint
from fvrt.builder.checkpoint import ModelVersion, SafetensorsFile, build_random, save_checkpoint
from fvrt.builder.configs import full_config, tiny_config
from fvrt.builder.models import dit as D
from fvrt.builder.quant import (
    FP8Linear,
    NVFP4Linear,
    Precision,
    QuantRecipe,
    layer_groups,
    quantize_model,
)
from fvrt.builder.quant import nvfp4 as Q4
from fvrt.builder.quant.calibrate import collect_amax_hooks, collect_amax_modelopt, convert_linears
from fvrt.builder.quant.fp8 import E4M3_MAX, quantize_fp8
from fvrt.builder.quant.layers import QUANT_METADATA_KEY

N_LAYERS = 4  # block 0 excluded (official list), blocks 1-3 quantised
STAGE1, STAGE2 = CalibShape(2, 2, 3, 8), CalibShape(2, 4, 6, 8)
TEXT_TOKENS = 16
FP8_TOL = 5e-2  # E4M3 has 3 mantissa bits: relative rounding error up to 2^-4 per operand


def tiny(version: ModelVersion, layers: int = N_LAYERS, *, wide: bool = False) -> dict:
    """The tiny config with `layers` blocks; `wide` doubles the head dims (video 32, audio 16 wide) so every
    Linear input is a multiple of the NVFP4 block (16)."""
    cfg = tiny_config(version)
    tr = cfg["transformer"]
    tr["num_layers"] = layers
    if wide:
        tr["attention_head_dim"] *= 2
        tr["audio_attention_head_dim"] *= 2
        tr["cross_attention_dim"] = tr["num_attention_heads"] * tr["attention_head_dim"]
        tr["audio_cross_attention_dim"] = tr["audio_num_attention_heads"] * tr["audio_attention_head_dim"]
    return cfg


def calib_inputs(dit: D.LTXDiT, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    passes = two_stage_passes(STAGE1, STAGE2, (1.0, 0.725), (0.421875,))
    return random_dit_inputs(dit, passes, text_tokens=TEXT_TOKENS, seed=seed)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def linear_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear, NVFP4Linear))}


# ---- FP8Linear ------------------------------------------------------------------------------------------------


def _fp8_layer(seed: int = 0) -> tuple[nn.Linear, FP8Linear, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 10, 64) * 3
    return lin, FP8Linear.from_linear(lin, x.abs().amax(), mode="emulate"), x


def test_fp8_linear_emulation_vs_reference() -> None:
    lin, q, x = _fp8_layer()
    with torch.no_grad():
        y, ref = q(x), lin(x)
    err = rel_error(y, ref)
    print(f"\nFP8Linear (emulated) vs fp32 nn.Linear: relative error {err:.3e}")
    assert 1e-4 < err < FP8_TOL  # quantisation happened, and within the E4M3 range
    # independent dequantise reference: per-tensor scales amax / 448, saturating E4M3 casts
    w_scale = lin.weight.abs().amax() / E4M3_MAX
    x_scale = x.abs().amax() / E4M3_MAX
    wq = (lin.weight / w_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    xq = (x / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    with torch.no_grad():
        expected = F.linear(xq.float() * x_scale, wq.float() * w_scale, lin.bias)
    assert torch.equal(q.weight, wq) and q.weight.dtype == torch.float8_e4m3fn
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == ()
    assert torch.equal(y, expected)


def test_fp8_linear_scaled_mm_path_matches_emulation() -> None:
    """The real-GEMM code path (operand layout, scales, bias handling) on torch's CPU `_scaled_mm` kernel."""
    _, q, x = _fp8_layer(1)
    real = copy.deepcopy(q)
    real.mode = "scaled_mm"
    with torch.no_grad():
        assert_rel_close(real(x), q(x), 1e-6, "fp32 out, bias added after")
        xb = x.bfloat16()
        real_b = copy.deepcopy(real).to(torch.bfloat16)  # bias -> bf16: fused into _scaled_mm
        assert real_b.weight.dtype == torch.float8_e4m3fn and real_b.bias.dtype == torch.bfloat16
        assert_rel_close(real_b(xb).float(), q(xb).float(), 1e-2, "bf16 out, fused bias")


def test_fp8_linear_saturates_and_keeps_dtypes() -> None:
    _, q, x = _fp8_layer(2)
    big = x * 100  # far beyond the calibrated amax: saturate at +-448, never inf / NaN
    assert quantize_fp8(big, q.input_scale).float().abs().max() == E4M3_MAX
    with torch.no_grad():
        assert torch.isfinite(q(big)).all()
    q16 = copy.deepcopy(q).to(torch.bfloat16)
    assert q16.weight.dtype == torch.float8_e4m3fn and q16.weight_scale.dtype == torch.float32
    assert torch.equal(q16.weight_scale, q.weight_scale) and torch.equal(q16.input_scale, q.input_scale)
    assert q16.bias.dtype == torch.bfloat16
    assert {n for n, _ in q.named_parameters()} == {"weight", "weight_scale", "input_scale", "bias"}


# ---- recipes --------------------------------------------------------------------------------------------------


def test_recipe_official_exclusions_full_size(version: ModelVersion) -> None:
    """At full size (built on meta, no weights): exactly blocks 1-42 are quantised, every Linear in them."""
    with torch.device("meta"):
        dit = D.build_dit(full_config(version))
    names = set(QuantRecipe.named("fp8").select_linears(dit))
    all_linears = {n for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    expected = {n for n in all_linears if n.startswith("transformer_blocks.") and int(n.split(".")[1]) in range(1, 43)}
    assert names == expected
    per_block = len([n for n in names if n.startswith("transformer_blocks.1.")])
    assert per_block == (34 if version is ModelVersion.LTX23 else 28)  # 2.3 adds the 6 gate-logit Linears
    assert QuantRecipe.named("bf16").select_linears(dit) == []


def test_recipe_validation() -> None:
    assert QuantRecipe.named("nvfp4").precision is Precision.NVFP4
    with pytest.raises(ValueError, match="--precision"):
        QuantRecipe.named("int8")


# ---- calibration ----------------------------------------------------------------------------------------------


def test_calibration_scales_are_amax_over_448(version: ModelVersion) -> None:
    dit = build_random("dit", tiny(version), seed=3)
    inputs = calib_inputs(dit)
    recipe = QuantRecipe()
    names = recipe.select_linears(dit)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        dit.get_submodule(n).register_forward_hook(lambda _m, a, _o, n=n: seen[n].append(a[0].detach().clone()))
        for n in names
    ]
    with torch.no_grad():
        for inp in inputs:
            dit(**inp)
    for h in handles:
        h.remove()
    q = copy.deepcopy(dit)
    report = quantize_model(q, recipe, inputs, method="hooks")
    assert report.layers == names and report.passes == len(inputs)
    for n in names:
        observed = torch.cat([t.flatten() for t in seen[n]]).abs().max()
        layer = q.get_submodule(n)
        assert isinstance(layer, FP8Linear)
        assert torch.equal(layer.input_scale, (observed / E4M3_MAX).float()), n
        assert torch.equal(layer.weight_scale, (dit.get_submodule(n).weight.abs().amax() / E4M3_MAX).float()), n


def test_modelopt_calibration_matches_hooks(version: ModelVersion) -> None:
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt not installed")
    dit = build_random("dit", tiny(version), seed=4)
    inputs = calib_inputs(dit)
    recipe = QuantRecipe()
    names = recipe.select_linears(dit)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_amax, w_amax = collect_amax_modelopt(dit, recipe, inputs)
    hooks = collect_amax_hooks(dit, names, inputs)
    assert sorted(in_amax) == sorted(names)
    for n in names:
        assert torch.equal(in_amax[n], hooks[n]), n
        assert torch.equal(w_amax[n], dit.get_submodule(n).weight.abs().amax()), n
    # the model itself was never wrapped by ModelOpt and its weights are untouched
    assert all(type(m) in (nn.Linear,) for m in dit.modules() if isinstance(m, nn.Linear))
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


def test_quantized_dit_accuracy(version: ModelVersion) -> None:
    dit = build_random("dit", tiny(version, wide=True), seed=5)
    inputs = calib_inputs(dit)
    evals = calib_inputs(dit, seed=11)[::2]  # fresh inputs (a stage-1 and a stage-2 pass), not the calibration set
    amax = collect_amax_hooks(dit, QuantRecipe().select_linears(dit), inputs)  # one calibration, both formats
    with torch.no_grad():
        refs = [dit(**inp) for inp in evals]
    results = {}
    for precision in (Precision.FP8, Precision.NVFP4):
        q = copy.deepcopy(dit)
        convert_linears(q, amax, precision)
        kinds = linear_types(q)
        layer_cls = FP8Linear if precision is Precision.FP8 else NVFP4Linear
        for n, cls in kinds.items():
            quantised = n.startswith("transformer_blocks.") and not n.startswith("transformer_blocks.0.")
            assert cls is (layer_cls if quantised else nn.Linear), n
        worst = 1.0
        with torch.no_grad():
            for inp, ref in zip(evals, refs, strict=True):
                for a, b in zip(q(**inp), ref, strict=True):
                    worst = min(worst, cosine(a, b))
        results[precision.value] = worst
        assert worst > (0.99 if precision is Precision.FP8 else 0.95), (precision, worst)
    print(f"\n{version.value} tiny DiT ({N_LAYERS} blocks, block 0 kept): worst velocity cosine vs fp32 {results}")
    narrow = build_random("dit", tiny(version), seed=5)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        quantize_model(narrow, QuantRecipe(precision=Precision.NVFP4), inputs[:1], method="hooks")


# ---- export / per-layer engines -------------------------------------------------------------------------------


def _block_inputs(dit: D.LTXDiT, inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    video, audio = dit.prepare(
        video_timesteps=inp["video_timesteps"],
        audio_timesteps=inp["audio_timesteps"],
        video_sigma=inp["video_sigma"],
        audio_sigma=inp["audio_sigma"],
        video_positions=inp["video_positions"],
        audio_positions=inp["audio_positions"],
        dtype=torch.float32,
    )
    cv, ca = dit.prepare_context(inp["video_context"], inp["audio_context"])
    vx, ax = dit.patchify_proj(inp["video_latent"]), dit.audio_patchify_proj(inp["audio_latent"])
    fields = [t for t in (*video, *audio) if t is not None]
    return (vx, ax, cv, ca, *fields)


@pytest.mark.parametrize("mode", ["emulate", "scaled_mm"])
def test_export_quantized_block(mode: str) -> None:
    """A quantised block exports; its FP8 weights and scales are per-layer inputs like any other parameter."""
    from fvrt.builder.engines import DiTBlockEngine

    dit = build_random("dit", tiny(ModelVersion.LTX23), seed=6)
    inputs = calib_inputs(dit)
    quantize_model(dit, QuantRecipe(), inputs, method="hooks")
    for m in dit.modules():
        if isinstance(m, FP8Linear):
            m.mode = mode
    assert layer_groups(dit.transformer_blocks) == [[0], [1, 2, 3]]
    engine = DiTBlockEngine(dit.transformer_blocks[1], has_prompt=True).eval()
    with torch.no_grad():
        args = _block_inputs(dit, inputs[0])
        ep = torch.export.export(engine, args)
        got, want = ep.module()(*args), engine(*args)
        for a, b in zip(got, want, strict=True):
            assert_rel_close(a, b, 1e-6, f"exported block ({mode})")
        # block 2's weights through block 1's engine (torch.func.functional_call, as the per-layer backends do)
        params = {f"block.{k}": v for k, v in dit.transformer_blocks[2].named_parameters()}
        assert any(v.dtype == torch.float8_e4m3fn for v in params.values())
        out = torch.func.functional_call(engine, params, args)
        ref = dit.transformer_blocks[2](
            *args[:4], *DiTBlockEngine(dit.transformer_blocks[2], True).fields_to_streams(args[4:])
        )
        for a, b in zip(out, ref, strict=True):
            assert_rel_close(a, b, 1e-6, "per-layer weights as inputs")
    graph_ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if mode == "scaled_mm":
        assert "aten._scaled_mm.default" in graph_ops


# ---- official pre-quantised FP8 files -------------------------------------------------------------------------

_OPS_REGISTERED = False


def _register_trtllm_reference_ops() -> None:
    """CPU stand-ins for the two TensorRT-LLM ops ltx-core's FP8Linear calls (static per-tensor E4M3 quantise,
    cuBLAS scaled mm on a [in, out] weight), so the official module runs here and checks the file layout."""
    global _OPS_REGISTERED
    if _OPS_REGISTERED:
        return
    try:  # a real TensorRT-LLM install already defines them
        torch.ops.tensorrt_llm.static_quantize_e4m3_per_tensor  # noqa: B018
        pytest.skip("tensorrt_llm ops are installed; this test replaces them with CPU reference ops")
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("tensorrt_llm::static_quantize_e4m3_per_tensor", mutates_args=())
    def _quant(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale.clone()

    @torch.library.custom_op("trtllm::cublas_scaled_mm", mutates_args=())
    def _mm(
        a: torch.Tensor,
        b: torch.Tensor,
        scale_a: torch.Tensor,
        scale_b: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        out = F.linear(a.float() * scale_a, b.float().t() * scale_b, None if bias is None else bias.float())
        return out.to(out_dtype or torch.float32)

    _OPS_REGISTERED = True


def _official_fp8_load(path: Path) -> nn.Module:
    """ltx-core's `fp8-scaled-mm` load path (ModelLedger.transformer with QuantizationPolicy.fp8_scaled_mm(),
    whose constructor only refuses when tensorrt_llm is missing): FP8Linear modules, weights transposed."""
    from ltx_core.loader.sd_ops import SDOps
    from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder
    from ltx_core.model.transformer import LTXV_MODEL_COMFY_RENAMING_MAP, LTXModelConfigurator
    from ltx_core.quantization import FP8_PREPARE_MODULE_OPS, FP8_TRANSPOSE_SD_OPS

    ops = SDOps("chain", mapping=(*LTXV_MODEL_COMFY_RENAMING_MAP.mapping, *FP8_TRANSPOSE_SD_OPS.mapping))
    builder = SingleGPUModelBuilder(
        model_class_configurator=LTXModelConfigurator,
        model_path=str(path),
        model_sd_ops=ops,
        module_ops=(FP8_PREPARE_MODULE_OPS,),
    )
    return builder.build(device=torch.device("cpu")).eval()


def test_official_fp8_checkpoint_loads(tmp_path: Path, version: ModelVersion) -> None:
    from test_dit import official_dit, official_modalities, run_fvrt, run_official

    cfg = tiny(version)
    official = official_dit(cfg, seed=7)
    src = tmp_path / "bf16.safetensors"
    save_checkpoint(src, {"dit": official}, cfg)
    dit = load_checkpoint(src, stages=["dit"], dtype=torch.float32).dit
    recipe = QuantRecipe()
    report = quantize_model(dit, recipe, calib_inputs(dit), method="hooks")
    path = tmp_path / "fp8.safetensors"
    save_checkpoint(path, {"dit": dit}, cfg, extra_metadata={QUANT_METADATA_KEY: json.dumps(recipe.to_json())})

    # the file layout of the official -fp8 releases
    f = SafetensorsFile(path)
    scaled = sorted(k[: -len(".weight_scale")] for k in f.entries if k.endswith(".weight_scale"))
    assert scaled == sorted(f"model.diffusion_model.{n}" for n in report.layers)
    for layer in scaled:
        w, ws, xs = (f.entries[f"{layer}.{s}"] for s in ("weight", "weight_scale", "input_scale"))
        assert w.dtype == torch.float8_e4m3fn and ws.dtype == xs.dtype == torch.float32 and ws.shape == xs.shape == ()
        assert f.entries[f"{layer}.bias"].dtype == torch.float32
    dv = cfg["transformer"]["num_attention_heads"] * cfg["transformer"]["attention_head_dim"]
    assert f.entries["model.diffusion_model.transformer_blocks.1.ff.net.0.proj.weight"].shape == (4 * dv, dv)

    # fvrt loads it: FP8Linear exactly where the file has scales, no calibration, same numbers
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_checkpoint(path, stages=["dit"], dtype=dtype).dit
        assert linear_types(loaded) == linear_types(dit)
        q = loaded.get_submodule(report.layers[0])
        assert q.weight.dtype == torch.float8_e4m3fn and q.input_scale.dtype == torch.float32
        assert loaded.patchify_proj.weight.dtype == dtype
    loaded = load_checkpoint(path, stages=["dit"], dtype=torch.float32).dit
    video, audio = official_modalities(version, cfg, torch.float32, seed=2)
    fv, fa = run_fvrt(loaded, video, audio)
    rv, ra = run_fvrt(dit, video, audio)
    assert_rel_close(fv, rv, 1e-6, "video velocity, loaded fp8 file")  # (not bitwise: mmap'd operands may take
    assert_rel_close(fa, ra, 1e-6, "audio velocity, loaded fp8 file")  # other BLAS code paths than aligned ones)

    # ltx-core's own fp8-scaled-mm loader reads the same file into its FP8Linear layers (same layers, weight
    # transposed to [in, out]) and its forward matches ours
    from ltx_core.quantization.fp8_scaled_mm import FP8Linear as OfficialFP8Linear

    _register_trtllm_reference_ops()
    off = _official_fp8_load(path)
    off_layers = sorted(n for n, m in off.named_modules() if isinstance(m, OfficialFP8Linear))
    assert off_layers == sorted(report.layers)
    m = off.get_submodule(report.layers[0])
    assert torch.equal(m.weight.t(), dit.get_submodule(report.layers[0]).weight)
    ov, oa = run_official(off, video, audio)
    assert_rel_close(fv, ov, 1e-5, "video velocity vs official fp8-scaled-mm")
    assert_rel_close(fa, oa, 1e-5, "audio velocity vs official fp8-scaled-mm")


# ---- NVFP4 ----------------------------------------------------------------------------------------------------


def test_e2m1_rounding_and_packing() -> None:
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.equal(Q4.round_e2m1(grid), grid)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0])
    assert torch.equal(Q4.round_e2m1(ties), torch.tensor([0, 1, 1, 2, 2, 4, 4, 6, 6.0]))  # ties to even code
    values = torch.cat([grid, -grid[1:]])
    codes = Q4.e2m1_codes(values)
    assert torch.equal(Q4.e2m1_values(codes), values)
    assert torch.equal(Q4.e2m1_values(torch.arange(16)).abs()[:8], grid)
    torch.manual_seed(0)
    c = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    packed = Q4.pack_fp4(c)
    assert packed.shape == (5, 16) and torch.equal(packed[0, 0], c[0, 0] | (c[0, 1] << 4))
    assert torch.equal(Q4.unpack_fp4(packed), c)


def test_nvfp4_quantize_dequantize_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1) * 3  # rows of different magnitudes
    packed, scales, g = Q4.quantize_weight_nvfp4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 64)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (64, 8) and g.shape == ()
    dq = Q4.dequantize_weight_nvfp4(packed, scales, g)
    assert torch.equal(dq, Q4.fake_quantize(w, g, scales))  # packed storage == the emulated numbers
    assert torch.equal(Q4.fake_quantize(dq, g, scales), dq)  # idempotent
    err = rel_error(dq, w)
    print(f"\nNVFP4 weight quantize-dequantize relative error (Gaussian): {err:.4f}")
    assert 0.05 < err < 0.12
    # elementwise: within half a grid step of the element's block (grid spacing <= 2 units of block_scale*g)
    step = (scales.float() * g).repeat_interleave(Q4.BLOCK, dim=1)
    assert ((dq - w).abs() <= step * 1.0 + 1e-7).all()
    # activations (dynamic blocks, static global scale) behave the same
    x = torch.randn(300, 64)
    assert rel_error(Q4.fake_quantize(x, Q4.global_scale(x.abs().amax())), x) < 0.12


def test_nvfp4_matches_modelopt_packing() -> None:
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt not installed")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    torch.manual_seed(1)
    w = torch.randn(32, 64) * torch.rand(32, 1) * 5
    w[3, :16] = 0.0  # an all-zero block
    packed, scales, g = Q4.quantize_weight_nvfp4(w)
    qt, m_scales, m_g = NVFP4QTensor.quantize(w.clone(), Q4.BLOCK)
    assert torch.equal(packed, qt._quantized_data)
    assert torch.equal(scales.view(torch.uint8), m_scales.view(torch.uint8))
    assert torch.equal(g, m_g.reshape(()))


def test_nvfp4_linear_export_and_file_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 7, 64)
    q = NVFP4Linear.from_linear(lin, x.abs().amax())
    with torch.no_grad():
        y = q(x)
        err = rel_error(y, lin(x))
        ep = torch.export.export(q, (x,))
        assert torch.equal(ep.module()(x), y)
    print(f"\nNVFP4Linear (emulated) vs fp32 nn.Linear: relative error {err:.4f}")
    assert err < 0.2
    # NVFP4 DiT layers written and loaded back through the pre-quantised hook (fvrt's own NVFP4 layout)
    cfg = tiny(ModelVersion.LTX23, layers=2, wide=True)
    dit = build_random("dit", cfg, seed=8)
    quantize_model(dit, QuantRecipe(precision=Precision.NVFP4), calib_inputs(dit), method="hooks")
    path = tmp_path / "nvfp4.safetensors"
    save_checkpoint(path, {"dit": dit}, cfg)
    loaded = load_checkpoint(path, stages=["dit"], dtype=torch.float32).dit
    assert linear_types(loaded) == linear_types(dit)
    inp = calib_inputs(dit, seed=3)[0]
    with torch.no_grad():
        for a, b in zip(loaded(**inp), dit(**inp), strict=True):
            assert_rel_close(a, b, 1e-6, "NVFP4 file round trip")
