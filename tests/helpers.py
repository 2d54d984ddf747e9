"""Shared test utilities: one tolerance helper for every parity check, and random DiT calibration inputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from fvrt.builder.models import dit as D
from fvrt.runtime.shapes import LATENT_CHANNELS

if TYPE_CHECKING:
    from fvrt.builder.build import BuildResult


class TinyBuild(NamedTuple):
    """A finished engine build: its directory, what `build_engines` returned and its wall time in seconds."""

    path: Path
    result: BuildResult
    seconds: float


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` as relative path -> (size, mtime_ns): it changes when anything writes there."""
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*")}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_replays_on_new_inputs(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """`fn(q, k, v)` (an attention op on CUDA tensors) is captured by a CUDA graph and its replay computes the
    attention of new inputs written into the same tensors: what the runtime's graphs rely on. The first eager call
    compiles or loads what it needs outside the capture."""
    want = fn(q, k, v).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(q, k, v)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn(q, k, v)) and not torch.equal(out, want)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "output") -> None:
    """Relative-error check that reports the mismatch: relative error, max abs diff and its index."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: non-finite values in output")
    if expected.abs().max() == 0:
        raise AssertionError(f"{what}: reference is all zeros; the check would prove nothing")
    err = rel_error(actual, expected)
    if err > tol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; max |diff| {diff.max().item():.3e} at {idx} "
            f"(actual {actual[idx].item():.6g}, expected {expected[idx].item():.6g})"
        )


# ---- random DiT calibration inputs (the build calibrates on real pipeline runs; the quantisation tests on these)

STAGE1_SIGMAS: tuple[float, ...] = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875)
"""Distilled stage-1 sigmas at which the DiT runs (ltx_pipelines/utils/constants.py DISTILLED_SIGMA_VALUES[:-1])."""
STAGE2_SIGMAS: tuple[float, ...] = (0.909375, 0.725, 0.421875)
"""Distilled stage-2 sigmas (STAGE_2_DISTILLED_SIGMA_VALUES[:-1])."""
CALIB_FPS = 24.0


class CalibShape(NamedTuple):
    """Latent sizes of one calibration pass: video (frames, height, width) latents, audio latents."""

    frames: int
    height: int
    width: int
    audio: int


def random_dit_inputs(
    dit: nn.Module,
    passes: Sequence[tuple[CalibShape, float]],
    *,
    text_tokens: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """`LTXDiT.forward` kwargs for each (shape, sigma): latents `(1 - sigma) * x0 + sigma * noise` (x0, noise
    ~ N(0, 1)), the first latent frame image-conditioned (timestep 0), random text contexts of the widths the
    DiT expects (caption width for LTX-2, DiT widths for 2.3)."""
    cfg = dit.cfg
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    ctx_v = cfg.caption_channels or cfg.dim
    ctx_a = cfg.caption_channels or cfg.audio_dim
    out = []
    for shape, sigma in passes:
        nv = shape.frames * shape.height * shape.width
        s = torch.tensor(sigma, device=device)
        vmask = torch.ones(1, nv, device=device)
        vmask[:, : shape.height * shape.width] = 0.0  # image-conditioned first latent frame
        out.append(
            {
                "video_latent": ((1 - s) * randn(1, nv, LATENT_CHANNELS) + s * randn(1, nv, LATENT_CHANNELS)).to(dtype),
                "audio_latent": (
                    (1 - s) * randn(1, shape.audio, LATENT_CHANNELS) + s * randn(1, shape.audio, LATENT_CHANNELS)
                ).to(dtype),
                "video_timesteps": (vmask * s).to(dtype),
                "audio_timesteps": torch.full((1, shape.audio), sigma, device=device).to(dtype),
                "video_sigma": s,
                "audio_sigma": s,
                "video_positions": D.video_positions(*shape[:3], CALIB_FPS, dtype=dtype, device=device),
                "audio_positions": D.audio_positions(shape.audio, device=device),
                "video_context": randn(1, text_tokens, ctx_v).to(dtype),
                "audio_context": randn(1, text_tokens, ctx_a).to(dtype),
            }
        )
    return out


def two_stage_passes(
    stage1: CalibShape,
    stage2: CalibShape,
    sigmas1: Sequence[float] = STAGE1_SIGMAS,
    sigmas2: Sequence[float] = STAGE2_SIGMAS,
) -> list[tuple[CalibShape, float]]:
    """(shape, sigma) of every DiT pass of the distilled two-stage pipeline."""
    return [(stage1, s) for s in sigmas1] + [(stage2, s) for s in sigmas2]


def gpu_attention_video_psnr(cudnn_dir: Path, folder: Path, attention: str) -> float:
    """Tiny bf16 CUDA engines built with --attention `attention` into `folder` from a copy of `cudnn_dir` (a tiny
    bf16 CUDA build with --attention cudnn: only the DiT engines are recompiled, the others are reused). The
    pipeline must capture every engine call of both in CUDA graphs and replay to the same video; returns the PSNR
    (dB) of the `attention` engines' video against the cuDNN engines' (same weights, prompt and seed)."""
    import math
    import shutil

    import numpy as np

    from fvrt.builder.build import BuildRequest, build_engines
    from fvrt.builder.engines import PRESET_PROFILES
    from fvrt.runtime.engine import EngineDir
    from fvrt.runtime.pipeline import Pipeline, Request
    from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer

    tiny = PRESET_PROFILES["tiny"]
    shutil.copytree(cudnn_dir, folder)
    result = build_engines(
        BuildRequest(out_dir=folder, random="tiny", precision="bf16", device="cuda", attention=attention),
        log=lambda _: None,
    )
    assert {n for n in result.built if not n.startswith("dit_")} == set(), result.built  # only the DiT recompiled
    frames = {}
    for mode, out in (("cudnn", cudnn_dir), (attention, folder)):
        pipe = Pipeline(EngineDir.open(out), PromptTokenizer(out / TOKENIZER_DIR), memory="keep")
        req = Request("a red fox runs through snow", tiny.height, tiny.width, tiny.frames, tiny.fps, seed=3)
        first, again = pipe(req), pipe(req)
        assert not pipe.graphs.failures, pipe.graphs.failures
        assert np.array_equal(first.frames, again.frames)
        frames[mode] = first.frames.astype(np.float64)
    mse = float(np.mean((frames[attention] - frames["cudnn"]) ** 2))
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))
