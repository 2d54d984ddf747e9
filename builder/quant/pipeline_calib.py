"""Calibration data from real pipeline runs: the DiT inputs of every step of both stages for calibration prompts.

The distilled pipeline (`fvrt.runtime.pipeline.Pipeline`, the very code `fvrt-run` uses) runs eagerly on the
unquantised checkpoint (`EagerEngineSet`) for each prompt, alternating text-to-video and image-to-video with the
calibration images; every DiT pass is recorded as `LTXDiT.forward` keyword arguments (latents, per-token
timesteps, sigmas, positions, text contexts). So the activation ranges come from the real trajectories:
text contexts from the real text encoder and connectors, latents from the Euler loop at the schedule's sigmas,
stage 2 from the upsampled stage-1 result re-noised, conditioned first frames at timestep 0.

The prompts file is `calib_data/prompts.txt` (one prompt per line, '#' comments); images `calib_data/images/`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fvrt.builder.checkpoint import LTXCheckpoint
from fvrt.builder.eager import EagerEngineSet
from fvrt.builder.stages.dit import dit_forward_kwargs
from fvrt.runtime.shapes import Profile, key_stage

Log = Callable[[str], None]


def read_prompts(path: Path) -> list[str]:
    """Prompts of a calibration file: non-empty lines that are not '#' comments."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """`count` items taken evenly over `items` (so a short run still covers every category of the file)."""
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def dit_call_kwargs(profile: Profile, key: str, *call: torch.Tensor) -> dict[str, torch.Tensor]:
    """One pipeline DiT call (`Pipeline(on_dit_pass=...)`'s arguments: key, video, audio, video_context,
    audio_context, video_t, index, sigma) as `LTXDiT.forward` keyword inputs of the profile's stage-1 or stage-2
    shape."""
    video, audio, vctx, actx, video_t, index, sigma = call
    stage = key_stage(key)
    prep = (video_t, index, sigma.view(1, 1), sigma, sigma)
    return dit_forward_kwargs(profile, stage, prep, (video, audio, vctx, actx), positions_dtype=video.dtype)


def pipeline_dit_inputs(
    ckpt: LTXCheckpoint,
    profile: Profile,
    prompts: Sequence[str],
    tokenizer_dir: Path,
    *,
    images: Sequence[Path] = (),
    preset: str = "distilled",
    device: torch.device | str = "cpu",
    log: Log = lambda _: None,
) -> list[dict[str, torch.Tensor]]:
    """Run the pipeline once per prompt (seed = its index; every second prompt conditioned on the next image) and
    return the `LTXDiT.forward` inputs of every DiT pass, in call order. Each run stops after its last DiT pass
    (nothing is decoded)."""
    from fvrt.runtime.pipeline import Pipeline, Request
    from fvrt.runtime.tokenizer import PromptTokenizer

    engines = EagerEngineSet(ckpt, [profile], device=device)
    recorded: list[dict[str, torch.Tensor]] = []

    def record(key: str, *call: torch.Tensor) -> None:
        kw = dit_call_kwargs(profile, key, *call)
        recorded.append({k: t.clone() for k, t in kw.items()})  # the pipeline reuses its buffers

    # every run stops after its last DiT pass: the eager 1080p video decode needs ~27 GB more, on top of the whole
    # unquantised checkpoint on the GPU (text encoder included), which ran an 80 GB H100 out of memory
    pipe = Pipeline(engines, PromptTokenizer(tokenizer_dir), cuda_graphs=False, on_dit_pass=record)
    for i, prompt in enumerate(prompts):
        image = images[(i // 2) % len(images)] if images and i % 2 == 1 else None
        req = Request(
            prompt=prompt,
            height=profile.height,
            width=profile.width,
            frames=profile.frames,
            fps=profile.fps,
            seed=i,
            preset=preset,
            image=image,
        )
        pipe(req, decode=False)
        log(f"calibration: prompt {i + 1}/{len(prompts)} ({'image' if image else 'text'}-to-video) done")
    return recorded


__all__ = ["dit_call_kwargs", "pipeline_dit_inputs", "read_prompts", "spread"]
