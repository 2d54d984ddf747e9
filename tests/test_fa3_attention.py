"""FlashAttention-3's FP8 kernel as the DiT engines' attention (fvrt.plugins.fa3_attention, `--attention fa3fp8`).

On the CPU: the op's fallback is SDPA on exactly the dequantized inputs the kernel would get, the quantization
(smoothed K and V, a descale per head) stays within 8-bit error of fp32 on random and trained-like inputs and is
exported as plain torch code in front of the op, routing keeps small attentions and other head dims on SDPA, and
the build and the runtime refuse where the kernel cannot run (the AOTInductor call-back path is tested for every
call-back mode in tests/test_fa4_attention.py). The kernel runs only on a Hopper GPU with FlashAttention-3 built by
lab/fa3_build.py (GPU-marked tests below); tiny engines cannot use it (their head dims are 8 and 4)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_replays_on_new_inputs, rel_error

from fvrt.builder.build import BuildError, BuildRequest, build_engines
from fvrt.builder.models.common import kernel_attention, sdpa
from fvrt.plugins import CALLBACK_ATTENTION, fa3_attention, fa3_exact, kernel_attention_fn
from fvrt.runtime.engine import check_attention_kernels
from fvrt.runtime.manifest import EngineError
from fvrt.runtime.precision import min_compute_capability


def _qkv(seed: int, tq: int = 96, tk: int = 80, d: int = 128, device: str = "cpu", offset: bool = False):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(2, 3, t, d, generator=g, device=device) for t in (tq, tk, tk))
    if offset:  # what trained K and V projections hold: per-channel means, outlier channels
        chan = torch.arange(d, device=device)
        k = k + 6.0 * torch.randn(1, 1, 1, d, generator=g, device=device) + 20.0 * (chan % 31 == 0)
        v = v + 3.0 * torch.randn(1, 1, 1, d, generator=g, device=device)
    return q, k, v


class _Sdpa(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v)


def test_the_fallback_is_sdpa_on_what_the_kernel_is_given() -> None:
    q, k, v = _qkv(0)
    z, _ = fa3_attention.quantize(q, k, v)
    q8, k8, v8, qs, ks, vs = z
    assert (q8.dtype, q8.shape, qs.shape, qs.dtype) == (torch.float8_e4m3fn, (2, 96, 3, 128), (2, 3), torch.float32)
    assert float(q8.float().abs().max()) == fa3_attention.E4M3_MAX  # each head's amax lands on E4M3's largest value
    got = fa3_attention.fa3fp8_attention(*z)
    assert got.shape == (2, 96, 3, 128) and got.dtype == torch.bfloat16 and got.is_contiguous()
    deq = lambda x8, s: x8.float().transpose(1, 2) * s[:, :, None, None]  # noqa: E731
    want = F.scaled_dot_product_attention(deq(q8, qs), deq(k8, ks), deq(v8, vs))
    assert torch.equal(got, want.transpose(1, 2).to(torch.bfloat16))


@pytest.mark.parametrize("offset", [False, True])
def test_the_quantization_keeps_attention_within_8_bit_error(offset: bool) -> None:
    """Keys with large per-channel offsets (trained-like) are what per-tensor FP8 without smoothing cannot hold;
    subtracting K's token mean removes them exactly (softmax ignores it), V's mean is added back after the op."""
    q, k, v = _qkv(1, offset=offset)
    exact = F.scaled_dot_product_attention(q, k, v)
    got = fa3_attention.kernel(q, k, v)
    assert got.shape == exact.shape and got.dtype == q.dtype
    assert rel_error(got, exact) < 0.06, rel_error(got, exact)
    with pytest.raises(ValueError, match="takes head dim 128"):
        fa3_attention.kernel(*_qkv(2, d=64))


def test_fa3fp8_is_a_call_back_mode_of_the_dit_engines_only_and_needs_hopper() -> None:
    assert CALLBACK_ATTENTION["fa3fp8"] is fa3_attention and kernel_attention_fn("fa3fp8") is fa3_attention.attention
    assert min_compute_capability("fp8", "fa3fp8") == ((9, 0), "fp8 with FlashAttention-3 FP8 attention")
    assert fa3_attention.supported(torch.device("cpu")) == "FlashAttention-3's FP8 kernel runs on CUDA GPUs only"
    settings = fa3_attention.describe()["attention_settings"]
    assert settings["min_tokens"] == fa3_attention.MIN_TOKENS == 16_384
    assert settings["bf16_min_tokens"] == fa3_exact.MIN_TOKENS == 8_000
    assert settings["smooth_k"] and settings["smooth_v"]


@pytest.mark.parametrize("mode", ["fa3fp8", "fa3"])
def test_small_attentions_and_other_head_dims_stay_on_sdpa(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only attentions of >= MIN_TOKENS queries and keys at head dim 128 reach the op; for fa3fp8 the quantization
    is torch code in the graph (Inductor fuses it into the producers), not inside the op."""
    plugin = CALLBACK_ATTENTION[mode]
    monkeypatch.setattr(plugin, "MIN_TOKENS", 81)
    op = plugin.OP_NAME.replace("::", ".") + ".default"
    for tq, tk, d, want in ((96, 80, 128, False), (96, 81, 64, False), (96, 81, 128, True)):
        q, k, v = _qkv(4, tq=tq, tk=tk, d=d)
        with kernel_attention(mode):
            ep = torch.export.export(_Sdpa(), (q, k, v))
        ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert (op in ops) == want, (tq, tk, d, ops)
        assert any("scaled_dot_product" in o for o in ops) == (not want), (tq, tk, d, ops)
        quantized = any("amax" in o for o in ops) and any(o == "aten.to.dtype" for o in ops)
        assert quantized == (want and mode == "fa3fp8"), (tq, tk, d, ops)


def test_fa3fp8_gives_the_exact_kernel_what_fa3_routes_below_its_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """fa3fp8 = fa3's routing plus FP8 from its own threshold: below fa3_exact.MIN_TOKENS cuDNN (SDPA), from there the
    exact bf16 op unquantized, from fa3_attention.MIN_TOKENS the FP8 op (the 1080p stage-1 and stage-2 video
    self-attentions: 8,160 and 32,640 tokens)."""
    monkeypatch.setattr(fa3_exact, "MIN_TOKENS", 40)
    monkeypatch.setattr(fa3_attention, "MIN_TOKENS", 81)
    fp8_op, exact_op = (m.OP_NAME.replace("::", ".") + ".default" for m in (fa3_attention, fa3_exact))
    cases = ((32, 48, 128, "sdpa"), (48, 80, 128, exact_op), (96, 81, 128, fp8_op), (96, 96, 64, "sdpa"))
    for tq, tk, d, want in cases:
        q, k, v = _qkv(5, tq=tq, tk=tk, d=d)
        with kernel_attention("fa3fp8"):
            ep = torch.export.export(_Sdpa(), (q, k, v))
            got = _Sdpa()(q, k, v)
        ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        calls = [o for o in ops if o in (fp8_op, exact_op) or "scaled_dot_product" in o]
        assert len(calls) == 1 and (calls[0] == want or (want == "sdpa" and "scaled_dot_product" in calls[0])), ops
        exact = F.scaled_dot_product_attention(q, k, v)
        assert rel_error(got, exact) < (0.06 if want == fp8_op else 1e-6), (tq, tk, d)


def test_fa3_exact_is_sdpa_off_the_gpu_and_a_hopper_call_back_mode() -> None:
    q, k, v = _qkv(6)
    got = fa3_exact.kernel(q, k, v)
    assert got.shape == q.shape and torch.equal(got, F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="takes head dim 128"):
        fa3_exact.kernel(*_qkv(2, d=64))
    assert CALLBACK_ATTENTION["fa3"] is fa3_exact and kernel_attention_fn("fa3") is fa3_exact.attention
    assert min_compute_capability("bf16", "fa3") == ((9, 0), "bf16 with FlashAttention-3 attention")
    entry = fa3_exact.describe()
    assert entry["attention_kernel"] == "flash_attn_3"
    assert entry["attention_settings"] == {"format": "bf16", "min_tokens": fa3_exact.MIN_TOKENS}


def _manifest(attention: str) -> SimpleNamespace:
    entry = lambda a: SimpleNamespace(extra={"attention": a})  # noqa: E731
    return SimpleNamespace(stages={"text_out": entry("cudnn"), "dit_block": entry(attention)})


@pytest.mark.parametrize(
    ("mode", "name", "kernel"),
    [
        ("fa3fp8", "FlashAttention-3 FP8", "FlashAttention-3's FP8 kernel"),
        ("fa3", "FlashAttention-3", "FlashAttention-3's kernel"),
    ],
)
def test_the_runtime_and_the_build_refuse_fa3_modes_where_they_cannot_run(
    tmp_path: Path, mode: str, name: str, kernel: str
) -> None:
    with pytest.raises(
        EngineError,
        match=rf"engine dit_block was built with --attention {mode} \({name}\): {kernel} runs on CUDA GPUs only$",
    ):
        check_attention_kernels(Path("eng"), _manifest(mode), torch.device("cpu"))
    out = tmp_path / "eng"
    with pytest.raises(BuildError, match=rf"^--attention {mode}: {kernel} runs on CUDA GPUs only$"):
        build_engines(BuildRequest(out_dir=out, random="tiny", device="cpu", attention=mode), log=lambda _: None)
    assert not out.exists()


def test_available_says_how_to_build_it_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    missing = lambda name, *a: None if name == "flash_attn_3" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    assert fa3_attention.available() == (
        "flash_attn_3 is not installed (build FlashAttention-3's Hopper forward with lab/fa3_build.py and put its "
        "--target on PYTHONPATH)"
    )


def test_the_op_imports_the_extension_before_it_looks_up_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    # an AOTInductor engine calls the op back in a process that never asked available(): without the import,
    # torch.ops.flash_attn_3 has no `fwd` (as the first full-size fa3fp8 engine found on an H100, 2026-12-07)
    imported: list[str] = []

    def record(name: str) -> None:
        imported.append(name)
        raise ImportError(name)

    monkeypatch.setattr(fa3_attention.importlib, "import_module", record)
    fa3_attention.forward.cache_clear()
    with pytest.raises(ImportError):
        fa3_attention.forward()
    fa3_attention.forward.cache_clear()
    assert imported == ["flash_attn_3._C"]


# ---- GPU (Hopper with FlashAttention-3 built by lab/fa3_build.py) ----------------------------------------------


def _need_fa3() -> None:
    if why := fa3_attention.supported(torch.device("cuda")):
        pytest.skip(why)


@pytest.mark.gpu
def test_fa3fp8_kernel_error_on_random_and_trained_like_inputs() -> None:
    """Against fp32 attention, self and cross attention with partial tiles, plain and offset keys: the error of an
    8-bit P V (fvrt's smoothed Triton kernel: 0.06 on random inputs)."""
    _need_fa3()
    for tq, tk in ((1000, 1000), (513, 128), (300, 777)):
        for offset in (False, True):
            q, k, v = (t.to(torch.bfloat16) for t in _qkv(tq + tk, tq, tk, device="cuda", offset=offset))
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            got = fa3_attention.kernel(q, k, v)
            assert got.shape == q.shape and got.dtype == torch.bfloat16 and not got.isnan().any()
            assert rel_error(got, exact) < 0.08, (tq, tk, offset, rel_error(got, exact))


@pytest.mark.gpu
def test_fa3fp8_op_is_captured_by_a_cuda_graph() -> None:
    _need_fa3()
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(5, 700, 700, device="cuda"))
    assert_replays_on_new_inputs(fa3_attention.kernel, q, k, v)


@pytest.mark.gpu
def test_fa3_exact_matches_cudnn_and_is_captured_by_a_cuda_graph() -> None:
    """Exact attention: FlashAttention-3's bf16 forward against fp32 within bf16's error (cuDNN's: 0.0023 on random
    inputs at full size), at partial tiles, plain and offset keys; then CUDA-graph capture and replay."""
    _need_fa3()
    for tq, tk in ((1000, 1000), (513, 128), (300, 777)):
        for offset in (False, True):
            q, k, v = (t.to(torch.bfloat16) for t in _qkv(tq + tk + 1, tq, tk, device="cuda", offset=offset))
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            got = fa3_exact.kernel(q, k, v)
            assert got.shape == q.shape and got.dtype == torch.bfloat16
            assert rel_error(got, exact) < 0.01, (tq, tk, offset, rel_error(got, exact))
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(8, 700, 700, device="cuda"))
    assert_replays_on_new_inputs(fa3_exact.kernel, q, k, v)
