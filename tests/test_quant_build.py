"""`fvrt-build --precision fp8|nvfp4` (torch-aot, CPU, tiny LTX-2.3): calibration on real pipeline runs over
calib_data with ModelOpt, one block engine per layer group (the official exclusion list keeps block 0 in bf16),
the engines against the eager quantised model, the quantised model against bf16, and the low-bit GPU checks.

CPU runs FP8 / NVFP4 through the layers' exact emulation; the real FP8 GEMM path is GPU-only (docs/quantization.md).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close

from fvrt.builder.build import BuildRequest, build_engines, link_or_copy
from fvrt.builder.checkpoint import ModelVersion
from fvrt.builder.eager import EagerEngineSet
from fvrt.builder.engines import PRESET_PROFILES
from fvrt.builder.quant.calibrate import quantize_model
from fvrt.builder.quant.pipeline_calib import pipeline_dit_inputs, read_prompts, spread
from fvrt.builder.quant.recipe import Precision, QuantRecipe
from fvrt.builder.random_release import load_tiny_release, write_tiny_release
from fvrt.runtime.engine import EngineDir, check_environment
from fvrt.runtime.manifest import EngineError, read_manifest

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "calib_data" / "prompts.txt"
IMAGES = sorted((ROOT / "calib_data" / "images").glob("*.png"))
TINY = PRESET_PROFILES["tiny"]
COUNT = 2


@pytest.fixture(scope="module")
def bf16_dit(module_tmp: Callable[[str], Path]) -> Path:
    """The tiny release's bf16 DiT engines. Each low-bit build here goes into a hard-linked copy of them, as the
    benchmark builds fp8 next to bf16, so it compiles only its quantised block group (one engine instead of five)."""
    out = module_tmp("bf16") / "engines"
    build_engines(BuildRequest(out_dir=out, random="tiny", precision="bf16", stages=("dit",)), log=lambda _: None)
    return out


def next_to(bf16: Path, out: Path) -> Path:
    """`out`: a hard-linked copy of the bf16 engine directory `bf16`, for a build into it."""
    shutil.copytree(bf16, out, copy_function=link_or_copy)
    return out


@pytest.fixture(scope="module")
def fp8_build(module_tmp: Callable[[str], Path], bf16_dit: Path) -> Path:
    out = next_to(bf16_dit, module_tmp("fp8") / "engines")
    result = build_engines(
        BuildRequest(out_dir=out, random="tiny", precision="fp8", stages=("dit",), calib_prompts=PROMPTS,
                     calib_count=COUNT),
        log=lambda _: None,
    )  # fmt: skip
    assert result.built == ["dit_block_1"] and result.rebound == ["dit_block"]
    return out


@contextlib.contextmanager
def engine_calls() -> Iterator[list[str]]:
    """The names of the engines an `EagerEngineSet` runs inside the block, in call order."""
    calls: list[str] = []
    run = EagerEngineSet.run

    def counted(self: EagerEngineSet, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.append(name)
        return run(self, name, key, *inputs)

    with mock.patch.object(EagerEngineSet, "run", counted):
        yield calls


@pytest.fixture(scope="module")
def models(module_tmp: Callable[[str], Path]) -> tuple:
    """(bf16 checkpoint, the same checkpoint quantised as the build does it, the recorded calibration passes)."""
    folder = module_tmp("release")
    write_tiny_release(folder, ModelVersion.LTX23, seed=0)
    plain = load_tiny_release(folder, torch.bfloat16, "cpu")
    quant = load_tiny_release(folder, torch.bfloat16, "cpu")
    prompts = spread(read_prompts(PROMPTS), COUNT)
    tok = module_tmp("tok")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(folder / "gemma"), local_files_only=True).save_pretrained(str(tok))
    with engine_calls() as calls:
        inputs = pipeline_dit_inputs(quant, TINY, prompts, tok, images=IMAGES)
    quantize_model(quant.dit, QuantRecipe.named("fp8"), inputs, method="modelopt")
    return plain, quant, inputs, calls


def test_calibration_runs_stop_before_decoding(models: tuple) -> None:
    """Only the DiT passes are needed: at 1080p the eager decode next to the whole checkpoint ran an 80 GB H100 out
    of memory. Every pass of both stages is still recorded (8 + 3 per distilled run)."""
    calls, inputs = models[3], models[2]
    assert "video_decoder" not in calls and "audio_decoder" not in calls
    assert calls.count("upsampler") == COUNT and len(inputs) == COUNT * (8 + 3)


def test_manifest_describes_the_layer_groups_and_calibration(fp8_build: Path) -> None:
    m = read_manifest(fp8_build)
    blocks = {n: e for n, e in m.stages.items() if e.per_layer}
    assert sorted(blocks) == ["dit_block", "dit_block_1"]
    assert blocks["dit_block"].precision == "bf16" and blocks["dit_block"].layers == [0]
    assert blocks["dit_block_1"].precision == "fp8"
    q = blocks["dit_block_1"].extra["quantization"]
    steps = 8 + 3  # distilled: 8 stage-1 and 3 stage-2 DiT passes per run
    assert q["method"] == "modelopt" and q["prompts"] == COUNT and q["passes"] == COUNT * steps
    assert q["images"] == len(IMAGES) and "*transformer_blocks.0.*" in q["recipe"]["exclude"]
    assert m.stages["dit_in"].precision == "bf16"


def test_fp8_engines_match_the_eager_quantised_model(fp8_build: Path, models: tuple) -> None:
    assert_blocks_match(EngineDir.open(fp8_build), models[1])


def assert_blocks_match(eng: EngineDir, quant: object) -> None:
    ref = EagerEngineSet(quant, [TINY])  # type: ignore[arg-type]
    assert eng.num_layers == ref.num_layers == len(quant.dit.transformer_blocks)
    spec = ref.specs["dit_block_1"]
    assert any(type(m).__name__ == "FP8Linear" for m in spec.per_layer[0].modules())
    for key in TINY_KEYS:
        inputs = tuple(t.clone() for t in spec.sample_inputs(key))
        for layer in range(eng.num_layers):
            got = eng.run_block(key, layer, *inputs)
            want = ref.run_block(key, layer, *inputs)
            for g, w in zip(got, want, strict=True):
                assert_rel_close(g.float(), w.float(), 2e-2, f"block {layer} [{key}]")


TINY_KEYS = ("tiny/s1", "tiny/s2")


def test_fp8_build_next_to_bf16_compiles_only_the_fp8_blocks(tmp_path: Path, models: tuple, bf16_dit: Path) -> None:
    """An fp8 build into a (hard-linked) copy of a bf16 directory, calibrated on given recorded passes (what the
    benchmark does with its bf16 run): the bf16 block group keeps the bf16 code with a weights file of its own
    layers (block 0 here; 0 and 43-47 at full size), prep / in / out are reused whole, only the FP8 group
    compiles; the bf16 directory stays intact."""
    _, quant, inputs, _ = models
    bf16, fp8 = bf16_dit, next_to(bf16_dit, tmp_path / "fp8")
    req = BuildRequest(out_dir=fp8, random="tiny", precision="fp8", stages=("dit",), calib_inputs=tuple(inputs))
    result = build_engines(req, log=lambda _: None)
    assert result.built == ["dit_block_1"] and result.rebound == ["dit_block"]
    assert sorted(result.reused) == ["dit_in", "dit_out", "dit_prep"]
    m = read_manifest(fp8)
    assert m.stages["dit_block"].layers == [0] and m.stages["dit_block"].per_layer == 1
    assert m.stages["dit_block"].precision == "bf16" and m.stages["dit_block_1"].precision == "fp8"
    assert m.stages["dit_block_1"].extra["quantization"]["passes"] == len(inputs)
    assert_blocks_match(EngineDir.open(fp8), quant)
    assert EngineDir.open(bf16).num_layers == len(quant.dit.transformer_blocks)  # sha256 still intact


def test_fp8_velocity_cosine_vs_bf16_on_every_calibration_step(models: tuple) -> None:
    plain, quant, inputs, _ = models
    assert len(inputs) == COUNT * 11
    with torch.no_grad():
        for i, kw in enumerate(inputs):
            for got, want in zip(quant.dit(**kw), plain.dit(**kw), strict=True):
                cos = F.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0)
                assert cos >= 0.99, f"pass {i}: cosine {float(cos):.4f}"


def test_quantised_build_bad_input(tmp_path: Path) -> None:
    from fvrt.builder.build import BuildError

    for kwargs, message in [
        ({"backend": "tensorrt-rtx", "precision": "nvfp4"}, "builds FP4 for compute capability 12.0 .* only"),
        ({"backend": "tensorrt-rtx", "precision": "nvfp4", "target_ccs": ("8.9",)}, "pass --target-cc 12.0"),
        ({"stages": ("dit_prep",)}, "include the dit_block engine"),
        ({"calib_prompts": tmp_path / "none.txt"}, "calibration prompts file not found"),
        ({"calib_count": 0}, "--calib-count: at least 1"),
    ]:
        with pytest.raises(BuildError, match=message):
            build_engines(BuildRequest(**{"out_dir": tmp_path / "e", "random": "tiny", "precision": "fp8", **kwargs}))
        assert not (tmp_path / "e").exists()


def test_low_bit_engines_refused_on_older_gpus(fp8_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = read_manifest(fp8_build)
    m = type(m)(**{**m.__dict__, "build": type(m.build)(**{**m.build.__dict__, "device": "cuda"})})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    with pytest.raises(EngineError, match=r"engine dit_block_1 is fp8, which needs .* 8\.9 or newer; this GPU is 8\.0"):
        check_environment(fp8_build, m, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    check_environment(fp8_build, m, torch.device("cuda"))  # Hopper: accepted
    stages = {**m.stages, "dit_block_1": type(m.stages["dit_block_1"])(
        **{**m.stages["dit_block_1"].__dict__, "precision": "nvfp4"})}  # fmt: skip
    with pytest.raises(EngineError, match=r"is nvfp4, which needs .* 10\.0 or newer; this GPU is 9\.0"):
        check_environment(fp8_build, type(m)(**{**m.__dict__, "stages": stages}), torch.device("cuda"))


def _fp32_quantised_block_spec(tmp_path: Path) -> object:
    from helpers import CalibShape, random_dit_inputs, two_stage_passes

    from fvrt.builder.engines import engine_specs

    write_tiny_release(tmp_path, ModelVersion.LTX23, seed=1)
    ck = load_tiny_release(tmp_path, torch.float32, "cpu")
    s1, s2 = (CalibShape(*TINY.latent(i), TINY.audio_latents) for i in (1, 2))
    passes = two_stage_passes(s1, s2)[::4]
    quantize_model(ck.dit, QuantRecipe.named("fp8"), random_dit_inputs(ck.dit, passes, text_tokens=16), method="hooks")
    return {s.name: s for s in engine_specs(ck, [TINY])}["dit_block_1"]


def test_fp8_block_exports_explicit_qdq_that_onnxruntime_matches(tmp_path: Path) -> None:
    """FP8Linear reaches ONNX as QuantizeLinear (saturating, float8e4m3fn) / DequantizeLinear pairs with the FP8
    weights as float8 graph inputs, and ONNX Runtime reproduces the emulated eager block."""
    from fvrt.builder.backends.onnx_export import export_onnx, onnxruntime_parity

    spec = _fp32_quantised_block_spec(tmp_path / "release")
    graph = export_onnx(spec, "tiny/s1", tmp_path / "block.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(graph.op_types)
    assert "Clip" not in graph.op_types  # no emulation ops left
    fp8_inputs = [i.name for i in graph.inputs if i.dtype == "float8_e4m3fn"]
    assert fp8_inputs and all(n.endswith(".weight") for n in fp8_inputs)
    errors = onnxruntime_parity(spec, "tiny/s1", graph)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize(("precision", "cc", "op"), [("fp8", "8.9", "QuantizeLinear"), ("nvfp4", "12.0",
                                                     "TRT_FP4DynamicQuantize")])  # fmt: skip
def test_low_bit_engines_build_with_tensorrt_rtx(tmp_path: Path, precision: str, cc: str, op: str) -> None:
    """FP8 for SM89 (Ada) and NVFP4 for SM120 (Blackwell GeForce), built on this CPU-only machine."""
    from fvrt.builder.backends import tensorrt as TB

    reason = TB.backend("tensorrt-rtx").available()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "rtx"
    build_engines(
        BuildRequest(out_dir=out, random="tiny", precision=precision, stages=("dit",), calib_prompts=PROMPTS,
                     calib_count=1, backend="tensorrt-rtx", target_ccs=(cc,), attention="decomposable"),
        log=lambda _: None,
    )  # fmt: skip
    m = read_manifest(out)
    assert m.stages["dit_block_1"].precision == precision and m.stages["dit_block"].precision == "bf16"
    assert op in m.stages["dit_block_1"].extra["op_types"]
    assert m.build.compute_capability == cc


def test_nvfp4_build_keeps_narrow_layers_bf16_and_runs(tmp_path: Path, bf16_dit: Path) -> None:
    """NVFP4 needs 16-element blocks: the tiny model's 8-wide audio Linears stay bf16 (logged and recorded in
    the recipe's exclusions); the other selected layers become NVFP4 (emulated on CPU) and the engines run."""
    out = next_to(bf16_dit, tmp_path / "nvfp4")
    build_engines(
        BuildRequest(out_dir=out, random="tiny", precision="nvfp4", stages=("dit",), calib_prompts=PROMPTS,
                     calib_count=1),
        log=lambda _: None,
    )  # fmt: skip
    m = read_manifest(out)
    block = m.stages["dit_block_1"]
    assert block.precision == "nvfp4" and m.stages["dit_block"].precision == "bf16"
    q = block.extra["quantization"]
    assert any(name.startswith("transformer_blocks.1.audio_attn1") for name in q["recipe"]["exclude"])
    assert q["layers"] > 0
    eng = EngineDir.open(out)
    spec_inputs = EagerEngineSet(load_tiny_release(_release(tmp_path), torch.bfloat16, "cpu"), [TINY])
    inputs = tuple(t.clone() for t in spec_inputs.specs["dit_block"].sample_inputs("tiny/s1"))
    for layer in range(eng.num_layers):
        assert all(torch.isfinite(t.float()).all() for t in eng.run_block("tiny/s1", layer, *inputs))


def _release(tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    write_tiny_release(folder, ModelVersion.LTX23, seed=0)
    return folder


def test_fp8_text_encoder_next_to_bf16(tmp_path: Path) -> None:
    """--text-precision fp8: only text_block compiles (FP8 Gemma layers, calibrated on every calibration prompt);
    text_in and text_out are the bf16 engines, reused; the FP8 chain matches the eager quantised Gemma and stays
    close to bf16 (context cosine >= 0.99 on every prompt tried)."""
    from fvrt.builder.quant.recipe import TEXT_ENCODER_DEFAULT_EXCLUDE
    from fvrt.runtime.pipeline import run_text_encoder
    from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer

    bf16, fp8 = tmp_path / "bf16", tmp_path / "fp8text"
    build_engines(BuildRequest(out_dir=bf16, random="tiny", precision="bf16", stages=("text_encoder",)), log=print)
    shutil.copytree(bf16, fp8, copy_function=link_or_copy)
    req = BuildRequest(out_dir=fp8, random="tiny", precision="bf16", stages=("text_encoder",), text_precision="fp8",
                       calib_prompts=PROMPTS, calib_method="hooks")  # fmt: skip
    result = build_engines(req, log=print)
    assert result.built == ["text_block"] and sorted(result.reused) == ["text_in", "text_out"]
    m = read_manifest(fp8)
    assert (m.stages["text_block"].precision, m.stages["text_in"].precision) == ("fp8", "bf16")
    q = m.stages["text_block"].extra["quantization"]
    assert q["prompts"] == len(read_prompts(PROMPTS)) and q["layers"] == 7 * len(m.stages["text_block"].layers)

    # the eager reference quantised the same way (hooks, every prompt, the same tokenizer)
    folder = tmp_path / "release"
    write_tiny_release(folder, ModelVersion.LTX23, seed=0)
    ckpt = load_tiny_release(folder, torch.bfloat16, "cpu")
    tok = PromptTokenizer(fp8 / TOKENIZER_DIR)
    calib = [dict(zip(("input_ids", "attention_mask"), tok(p), strict=True)) for p in read_prompts(PROMPTS)]
    quantize_model(ckpt.text_encoder, QuantRecipe.named("fp8"), calib, run=lambda g, i: g(**i), method="hooks",
                   exclude=list(TEXT_ENCODER_DEFAULT_EXCLUDE))  # fmt: skip
    eager = EagerEngineSet(ckpt, [TINY])
    eng_fp8, eng_bf16 = EngineDir.open(fp8), EngineDir.open(bf16)
    for prompt in spread(read_prompts(PROMPTS), 4):
        ids, mask = tok(prompt)
        got = run_text_encoder(eng_fp8, ids, mask)
        want = run_text_encoder(eager, ids, mask)
        ref = run_text_encoder(eng_bf16, ids, mask)
        for g, w, r in zip(got, want, ref, strict=True):
            assert_rel_close(g.float(), w.float(), 2e-2, f"fp8 text engines vs eager quantised: {prompt[:30]}")
            assert F.cosine_similarity(g.float().flatten(), r.float().flatten(), 0) >= 0.99, prompt[:30]


class _TrtFp4DynamicQuantize:
    """`trt::TRT_FP4DynamicQuantize` for onnx's reference evaluator: TensorRT's documented semantics (E4M3 block
    scales of block_amax / (6 * global), E2M1 values), computed with fvrt's NVFP4 helpers."""

    @staticmethod
    def op() -> type:
        import ml_dtypes
        import numpy as np
        from onnx.reference.op_run import OpRun

        from fvrt.builder.quant.nvfp4 import block_scales, round_e2m1

        class TRT_FP4DynamicQuantize(OpRun):
            op_domain = "trt"

            def _run(self, x, scale, axis=-1, block_size=16, scale_type=17):  # type: ignore[no-untyped-def]
                t, g = torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.tensor(float(scale))
                s = block_scales(t, g)
                xb = t.reshape(*t.shape[:-1], -1, block_size)
                q = torch.sign(xb) * round_e2m1(xb.abs() / (s.float().unsqueeze(-1) * g))
                return (
                    q.reshape(t.shape).numpy().astype(ml_dtypes.float4_e2m1fn),
                    s.float().numpy().astype(ml_dtypes.float8_e4m3fn),
                )

        return TRT_FP4DynamicQuantize


def test_nvfp4_block_exports_fp4_qdq_that_the_onnx_reference_matches(tmp_path: Path) -> None:
    """NVFP4Linear reaches ONNX in ModelOpt's form: activations trt::TRT_FP4DynamicQuantize -> DQ(scales) ->
    DQ(block 16), weights as FLOAT4E2M1 graph inputs (the packed bytes, retyped) -> DQ(E4M3 scales, FP32 global)
    -> DQ(block 16). onnx's reference evaluator (standard ops; the TensorRT op by its documented semantics)
    reproduces the emulated eager block: the nibble order, block layout and scale chain are right."""
    import ml_dtypes
    import numpy as np
    import onnx
    import onnx.numpy_helper
    from helpers import CalibShape, random_dit_inputs, two_stage_passes
    from onnx.reference import ReferenceEvaluator

    from fvrt.builder.backends.onnx_export import export_onnx
    from fvrt.builder.engines import engine_specs
    from fvrt.builder.quant.nvfp4 import e2m1_values, unpack_fp4

    folder = tmp_path / "release"
    write_tiny_release(folder, ModelVersion.LTX23, seed=1)
    ck = load_tiny_release(folder, torch.float32, "cpu")
    s1, s2 = (CalibShape(*TINY.latent(i), TINY.audio_latents) for i in (1, 2))
    inputs = random_dit_inputs(ck.dit, two_stage_passes(s1, s2)[::4], text_tokens=16)
    recipe = QuantRecipe.named("nvfp4")
    odd = [n for n in recipe.select_linears(ck.dit) if ck.dit.get_submodule(n).in_features % 16]
    quantize_model(ck.dit, recipe, inputs, method="hooks", exclude=[*recipe.exclude, *odd])
    spec = {s.name: s for s in engine_specs(ck, [TINY])}["dit_block_1"]
    graph = export_onnx(spec, "tiny/s1", tmp_path / "block.onnx")
    assert {"TRT_FP4DynamicQuantize", "DequantizeLinear"} <= set(graph.op_types) and "AsFloat4" not in graph.op_types
    fp4_inputs = [i.name for i in graph.inputs if i.dtype == "float4_e2m1"]
    assert fp4_inputs and all(n.endswith(".weight") for n in fp4_inputs)

    model = onnx.load(str(graph.path))
    ref = ReferenceEvaluator(model, new_ops=[_TrtFp4DynamicQuantize.op()])
    sample = tuple(t.clone() for t in spec.sample_inputs("tiny/s1"))
    weights = {n: t for n, t in zip(graph.weight_inputs, _layer_weights(spec, graph.weight_inputs), strict=True)}
    feed = {n: t.numpy() for n, t in zip(spec.input_names, sample, strict=True) if n in {i.name for i in graph.inputs}}
    for name, t in weights.items():
        if name in fp4_inputs:  # what the graph input holds: our packed bytes read by ONNX's FLOAT4E2M1 rule
            shape = [t.shape[0], 2 * t.shape[1]]
            proto = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT4E2M1, shape, t.numpy().tobytes(), raw=True)
            feed[name] = onnx.numpy_helper.to_array(proto)
            ours = e2m1_values(unpack_fp4(t))
            assert np.array_equal(feed[name].astype(np.float32), ours.numpy()), f"{name}: nibble order"
        elif t.dtype == torch.float8_e4m3fn:
            feed[name] = t.float().numpy().astype(ml_dtypes.float8_e4m3fn)
        else:
            feed[name] = t.numpy()
    got = ref.run(None, feed)
    with torch.no_grad():
        want = spec.module(*sample)
    for g, w, name in zip(got, want, spec.output_names, strict=True):
        assert_rel_close(torch.from_numpy(np.asarray(g, dtype=np.float32)), w.float(), 1e-4, f"nvfp4 onnx {name}")


def _layer_weights(spec: object, names: list[str]) -> list[torch.Tensor]:
    params = dict(spec.per_layer[0].named_parameters())  # type: ignore[attr-defined]
    return [params[n].detach() for n in names]


def test_statistics_gathered_during_the_pipeline_runs_equal_the_replay(module_tmp: Callable[[str], Path]) -> None:
    """`--calib-method hooks` without recorded inputs: `pipeline_dit_amax` observes every selected Linear while
    the calibration runs execute (block Linears hooked once on their group's code, named per layer), and must give
    what recording the passes and replaying them through the whole DiT gives, bit for bit, for every layer, from
    as many passes; no decoder runs."""
    from fvrt.builder.quant.calibrate import collect_amax_hooks
    from fvrt.builder.quant.pipeline_calib import pipeline_dit_amax

    folder = module_tmp("release-observed")
    write_tiny_release(folder, ModelVersion.LTX23, seed=0)
    ckpt = load_tiny_release(folder, torch.bfloat16, "cpu")
    tok = module_tmp("tok-observed")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(folder / "gemma"), local_files_only=True).save_pretrained(str(tok))
    prompts = spread(read_prompts(PROMPTS), COUNT)
    # every Linear of the DiT, not only the recipe's (block 1 alone at tiny size): both layers run one group's code,
    # and the Linears outside the blocks are hooked directly
    names = QuantRecipe(precision=Precision.FP8).select_linears(ckpt.dit, exclude=())
    blocks = {n.split(".")[1] for n in names if n.startswith("transformer_blocks.")}
    assert blocks == {"0", "1"} and any(not n.startswith("transformer_blocks.") for n in names)
    with engine_calls() as calls:
        observed, passes = pipeline_dit_amax(ckpt, TINY, prompts, tok, names, images=IMAGES)
    assert "video_decoder" not in calls and "audio_decoder" not in calls
    inputs = pipeline_dit_inputs(ckpt, TINY, prompts, tok, images=IMAGES)
    replayed = collect_amax_hooks(ckpt.dit, names, inputs)
    assert passes == len(inputs) == COUNT * (8 + 3)
    assert sorted(observed) == sorted(names)
    for n in names:  # the same inputs through the same modules: the same bits
        assert torch.equal(observed[n], replayed[n]), (n, observed[n], replayed[n])


def test_fp8_build_calibrated_by_hooks_during_the_runs(tmp_path: Path, models: tuple, bf16_dit: Path) -> None:
    """`--calib-method hooks` from prompts (what the bench's GPU builds use): the statistics come from the runs
    themselves (`pipeline_dit_amax`), and the engines equal the eager model quantised by ModelOpt on the recorded
    passes of the same runs (the two calibrators give the same maxima)."""
    fp8 = next_to(bf16_dit, tmp_path / "fp8-hooks")
    logs: list[str] = []
    req = BuildRequest(out_dir=fp8, random="tiny", precision="fp8", stages=("dit",), calib_prompts=PROMPTS,
                       calib_count=COUNT, calib_method="hooks")  # fmt: skip
    with mock.patch("fvrt.builder.quant.pipeline_calib.pipeline_dit_inputs", side_effect=AssertionError("recorded")):
        build_engines(req, log=logs.append)
    q = read_manifest(fp8).stages["dit_block_1"].extra["quantization"]
    assert q["method"] == "hooks" and q["passes"] == COUNT * (8 + 3) and q["prompts"] == COUNT
    assert_blocks_match(EngineDir.open(fp8), models[1])
