# Ported from ltx_core/components/{noisers,diffusion_steps}.py, ltx_core/utils.py (to_denoised/to_velocity),
# ltx_pipelines/utils/{helpers,samplers,constants}.py (ltx-core / ltx-pipelines 1.0.0)
"""Sigma schedules, latent states, initial noise and the Euler step of the distilled pipeline.

Everything here reproduces the official arithmetic operation for operation (fp32 math, results cast back to the
latent dtype), so the same seed gives the same latents as `ltx_pipelines.distilled.DistilledPipeline`:

- noise is drawn by `torch.randn(*tokens_shape, generator=, device=, dtype=latent dtype)` on the patchified
  token tensor ([1, N, 128]), in the official order: stage-1 video, stage-1 audio, stage-2 video, stage-2 audio
  (`denoise_audio_video` noises video then audio, each through `GaussianNoiser`);
- `latent = noise * (mask * scale) + latent * (1 - mask * scale)` (`GaussianNoiser`), so image-conditioned
  tokens (mask 1 - strength = 0) stay clean;
- per-token timesteps are `mask * sigma`; the DiT's velocity becomes `x0 = x - v * (mask * sigma)`; conditioned
  tokens are blended back, `x0 * mask + clean * (1 - mask)`; Euler moves `x + (x - x0) / sigma * (sigma_next -
  sigma)`.

No function here reads a tensor value on the host: the step loop never synchronises with the device.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

# ltx_pipelines/utils/constants.py DISTILLED_SIGMA_VALUES: the distilled model's 8-step stage-1 schedule.
DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
# ltx_pipelines/utils/constants.py STAGE_2_DISTILLED_SIGMA_VALUES: 3 refinement steps after upsampling; the
# first value is also the re-noising scale of the upsampled video and the stage-1 audio.
STAGE_2_SIGMAS = (0.909375, 0.725, 0.421875, 0.0)
# The "5+2" real-time schedule of FastVideo (github.com/hao-ai-lab/FastVideo; the 5 base + 2 refine steps of its
# real-time 1080p LTX-2.3 demo and of examples/inference/ltx2_3/*_5s2_*.yaml; see peers-and-anchors.md §1.2).
# Stage 1: `_distilled_subset_sigmas(5)` in fastvideo/pipelines/basic/ltx2/stages/ltx2_denoising.py (read at
# 076e6d8) keeps both ends of DISTILLED_SIGMAS and picks the 4 interior values minimising (largest gap, last
# gap, sum of squared gaps): indices 0, 4, 5, 6, 7, 8.
REALTIME_SIGMAS = (1.0, 0.975, 0.909375, 0.725, 0.421875, 0.0)
# Stage 2: fastvideo/pipelines/basic/ltx2/ltx2_pipeline.py (read at 1ea7278), refine `num_inference_steps == 2`:
# the official stage-2 schedule without 0.725 ("Reduced 2-step refine schedule"); re-noising stays at 0.909375.
REALTIME_STAGE_2_SIGMAS = (0.909375, 0.421875, 0.0)


class Preset(NamedTuple):
    """Stage-1 and stage-2 sigma schedules (each ends at 0; len - 1 Euler steps). The upsampled video and the
    stage-1 audio are re-noised at `stage_2[0]` (official `noise_scale=stage_2_sigmas[0]`)."""

    stage_1: tuple[float, ...]
    stage_2: tuple[float, ...]


PRESETS: dict[str, Preset] = {
    "distilled": Preset(DISTILLED_SIGMAS, STAGE_2_SIGMAS),  # the official DistilledPipeline, 8 + 3 steps
    "realtime": Preset(REALTIME_SIGMAS, REALTIME_STAGE_2_SIGMAS),  # 5 + 2 steps
}


class Schedule(NamedTuple):
    """One stage's sigmas as device tensors, prepared once before the step loop (no host->device copy per step).

    values: the sigmas as Python floats (fp32-exact); sigma: [S + 1] float32; dt: [S] float32,
    `sigma[i + 1] - sigma[i]` computed in fp32 as the official step does.
    """

    values: tuple[float, ...]
    sigma: torch.Tensor
    dt: torch.Tensor

    @property
    def steps(self) -> int:
        return self.dt.shape[0]


def schedule(sigmas: tuple[float, ...], device: torch.device) -> Schedule:
    """Device tensors of a sigma schedule (official: `torch.Tensor(SIGMAS).to(device)`, fp32)."""
    if len(sigmas) < 2 or sigmas[-1] != 0.0 or any(a <= b for a, b in itertools.pairwise(sigmas)):
        raise ValueError(f"a sigma schedule must decrease strictly to 0, got {sigmas}")
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    return Schedule(tuple(sigma.tolist()), sigma.to(device), (sigma[1:] - sigma[:-1]).to(device))


class LatentState(NamedTuple):
    """One modality's denoising state, patchified.

    latent [1, N, C] and clean [1, N, C] in the latent dtype; mask [1, N, 1] float32: 1 = generate, 1 - strength
    for image-conditioned tokens (official `LatentState.denoise_mask`)."""

    latent: torch.Tensor
    clean: torch.Tensor
    mask: torch.Tensor


def initial_state(
    latent: torch.Tensor, condition: torch.Tensor | None = None, strength: float = 1.0, start: int = 0
) -> LatentState:
    """State before noising: `latent` [1, N, C] (zeros for stage 1, the upsampled latent for stage 2), with the
    condition tokens [1, M, C] written over tokens start..start+M of both latent and clean, mask 1 - strength
    there (official `create_initial_state` + `VideoConditionByLatentIndex.apply_to`)."""
    latent = latent.clone()
    mask = torch.ones(*latent.shape[:2], 1, dtype=torch.float32, device=latent.device)
    if condition is not None:
        stop = start + condition.shape[1]
        latent[:, start:stop] = condition
        mask[:, start:stop] = 1.0 - strength
    return LatentState(latent, latent.clone(), mask)


def draw_noise(state: LatentState, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of the state's token shape and dtype: exactly the official draw."""
    x = state.latent
    return torch.randn(*x.shape, device=x.device, dtype=x.dtype, generator=generator)


def add_noise(state: LatentState, noise: torch.Tensor, scale: float | torch.Tensor) -> LatentState:
    """`GaussianNoiser`: latent = noise * (mask * scale) + latent * (1 - mask * scale), in the latent dtype.
    scale: 1.0 for stage 1, the fp32 tensor sigma_0 for stage 2 (as the official call passes them)."""
    scaled = state.mask * scale
    latent = noise * scaled + state.latent * (1 - scaled)
    return state._replace(latent=latent.to(state.latent.dtype))


def token_timesteps(state: LatentState, sigma: torch.Tensor) -> torch.Tensor:
    """Per-token timesteps [1, N, 1] float32: `mask * sigma` (official `timesteps_from_mask`)."""
    return state.mask * sigma


def denoised(state: LatentState, velocity: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x0 from the DiT's velocity (official `X0Model` + `post_process_latent`): `x - v * t`, then conditioned
    tokens replaced by their clean values. Returns [1, N, C] in the latent dtype."""
    x = state.latent
    x0 = (x.float() - velocity.float() * timesteps).to(x.dtype)
    return (x0 * state.mask + state.clean.float() * (1 - state.mask)).to(x0.dtype)


def euler_step(state: LatentState, x0: torch.Tensor, sched: Schedule, step: int) -> LatentState:
    """One Euler step from sigma[step] to sigma[step + 1] (official `EulerDiffusionStep.step`): velocity
    `(x - x0) / sigma` in fp32 (cast to the latent dtype as the official `to_velocity` does), then
    `x + velocity * dt` in fp32.

    The official code divides by `sigma.item()`, a host scalar, and CUDA divides by a host scalar as a
    multiplication by its reciprocal: dividing by the host float keeps the result bit-identical there too."""
    x = state.latent
    velocity = ((x.float() - x0.float()) / sched.values[step]).to(x.dtype)
    return state._replace(latent=(x.float() + velocity.float() * sched.dt[step]).to(x.dtype))
