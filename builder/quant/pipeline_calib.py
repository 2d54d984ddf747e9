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
from fvrt.builder.quant.calibrate import observe_amax
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
    recorded: list[dict[str, torch.Tensor]] = []

    def record(key: str, *call: torch.Tensor) -> None:
        kw = dit_call_kwargs(profile, key, *call)
        recorded.append({k: t.clone() for k, t in kw.items()})  # the pipeline reuses its buffers

    engines = EagerEngineSet(ckpt, [profile], device=device)
    _calibration_runs(engines, profile, prompts, tokenizer_dir, images, preset, record, log)
    return recorded


class _ObservedBlocks(EagerEngineSet):
    """`EagerEngineSet` that says which layer its block code is running: `run_block` applies the code of the
    layer group's first block with layer i's weights, so a hook on that first block's Linear fires for every
    layer of the group and reads the layer from here."""

    layer: int | None = None

    def block_code(self, layer: int) -> torch.nn.Module:
        """The block whose code runs layer `layer` (its group's first block)."""
        spec, _ = self._blocks[layer]
        return spec.module.block

    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.layer = layer
        try:
            return super().run_block(key, layer, *inputs)
        finally:
            self.layer = None


def pipeline_dit_amax(
    ckpt: LTXCheckpoint,
    profile: Profile,
    prompts: Sequence[str],
    tokenizer_dir: Path,
    names: Sequence[str],
    *,
    images: Sequence[Path] = (),
    preset: str = "distilled",
    device: torch.device | str = "cpu",
    log: Log = lambda _: None,
) -> tuple[dict[str, torch.Tensor], int]:
    """`pipeline_dit_inputs` then `calibrate.collect_amax_hooks` over what it recorded, in one go: the max |input|
    of each named DiT Linear (`transformer_blocks.<i>.<path>` or any other DiT module) observed while the same
    pipeline runs execute, and the number of DiT passes they made. Nothing is recorded or replayed: at 1080p on
    the H100 (2026-12-08) the replay of the 88 recorded passes and the conversion took 129.5 s of a 266 s
    calibration, and the recorded inputs held GPU memory until then. The pipeline runs the DiT as the engines
    do (prep, in, the blocks through their group's code, out); a test holds the statistics equal to the replay's."""
    engines = _ObservedBlocks(ckpt, [profile], device=device)
    dit = ckpt.dit
    amax: dict[str, torch.Tensor] = {}
    wanted = set(names)
    handles = []
    # a Linear inside a block: hooked once on its group's code (the group's first block), named per layer
    per_block: dict[tuple[int, str], torch.nn.Module] = {}  # (id of the group's code, path in the block) -> Linear
    for name in names:
        parts = name.split(".", 2)
        if parts[0] == "transformer_blocks" and len(parts) == 3 and parts[1].isdigit():
            code = engines.block_code(int(parts[1]))
            per_block[(id(code), parts[2])] = code.get_submodule(parts[2])
            continue

        def direct(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            observe_amax(amax, name, args[0])

        handles.append(dit.get_submodule(name).register_forward_pre_hook(direct))
    for (_, path), linear in per_block.items():

        def in_block(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], path: str = path) -> None:
            if engines.layer is None:
                raise RuntimeError(f"DiT block Linear '{path}' ran outside run_block: its layer is unknown")
            name = f"transformer_blocks.{engines.layer}.{path}"
            if name in wanted:  # the group's code also runs layers whose Linear the recipe leaves out
                observe_amax(amax, name, args[0])

        handles.append(linear.register_forward_pre_hook(in_block))
    passes = 0

    def count(key: str, *call: torch.Tensor) -> None:
        nonlocal passes
        passes += 1

    try:
        _calibration_runs(engines, profile, prompts, tokenizer_dir, images, preset, count, log)
    finally:
        for h in handles:
            h.remove()
    return amax, passes


def _calibration_runs(
    engines: EagerEngineSet,
    profile: Profile,
    prompts: Sequence[str],
    tokenizer_dir: Path,
    images: Sequence[Path],
    preset: str,
    on_dit_pass: Callable[..., None],
    log: Log,
) -> None:
    """One pipeline run per prompt (seed = its index; every second prompt conditioned on the next image), each
    stopping after its last DiT pass; `on_dit_pass` sees every pass's inputs."""
    from fvrt.runtime.pipeline import Pipeline, Request
    from fvrt.runtime.tokenizer import PromptTokenizer

    # every run stops after its last DiT pass: the eager 1080p video decode needs ~27 GB more, on top of the whole
    # unquantised checkpoint on the GPU (text encoder included), which ran an 80 GB H100 out of memory
    pipe = Pipeline(engines, PromptTokenizer(tokenizer_dir), cuda_graphs=False, on_dit_pass=on_dit_pass)
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


__all__ = ["dit_call_kwargs", "pipeline_dit_amax", "pipeline_dit_inputs", "read_prompts", "spread"]
