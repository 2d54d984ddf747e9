"""The official distilled pipeline as a test oracle: fp32 on CPU.

`ltx_pipelines.distilled.DistilledPipeline.__call__` hard-codes bf16 and `torch.cuda.synchronize()`, so
`official_distilled` wires the same ltx-core / ltx-pipelines components in the same order, line for line, with
dtype fp32 on CPU: `ModelLedger` builders for every model (the official loaders, key ops and configurators),
`encode_prompts`' two calls (Gemma `encode`, `EmbeddingsProcessor.process_hidden_states`),
`combined_image_conditionings`, `denoise_audio_video` with `GaussianNoiser(torch.Generator(device).manual_seed)`,
`euler_denoising_loop` + `simple_denoising_func`, `upsample_video`, the stage-2 call with
`noise_scale=sigmas[0]`, `decode_video` and `decode_audio`.

The official Gemma loader needs the tiny-config patch and the transformers-5 buffer population of
`tests/test_text.py` (`official_tiny_gemma`, `official_text_encoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import oracle  # noqa: F401  (installs the torchaudio stub before ltx_core is imported)
import torch
from oracle import official_tiny_gemma
from test_text import official_text_encoder


class OfficialOutput(NamedTuple):
    frames: torch.Tensor  # [F, H, W, 3] uint8
    audio: torch.Tensor  # [2, S] float32
    sample_rate: int
    video_noise_1: torch.Tensor  # the stage-1 initial video state (after noising), [1, Nv, 128]


@torch.inference_mode()
def official_distilled(
    main: Path,
    upsampler: Path,
    gemma: Path,
    *,
    prompt: str,
    seed: int,
    height: int,
    width: int,
    num_frames: int,
    frame_rate: float,
    image: Path | None = None,
    strength: float = 1.0,
    stage_1_sigmas: Sequence[float] | None = None,
    stage_2_sigmas: Sequence[float] | None = None,
) -> OfficialOutput:
    """`DistilledPipeline(main, gemma, upsampler, loras=[])(prompt, seed, height, width, num_frames, frame_rate,
    images)` in fp32 on CPU (sigmas default to the official constants)."""
    from ltx_core.components.diffusion_steps import EulerDiffusionStep
    from ltx_core.components.noisers import GaussianNoiser
    from ltx_core.model.audio_vae import decode_audio as vae_decode_audio
    from ltx_core.model.upsampler import upsample_video
    from ltx_core.model.video_vae import decode_video as vae_decode_video
    from ltx_core.types import LatentState, VideoPixelShape
    from ltx_pipelines.utils import ModelLedger, euler_denoising_loop
    from ltx_pipelines.utils.args import ImageConditioningInput
    from ltx_pipelines.utils.constants import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES
    from ltx_pipelines.utils.helpers import (
        assert_resolution,
        combined_image_conditionings,
        denoise_audio_video,
        simple_denoising_func,
    )
    from ltx_pipelines.utils.types import PipelineComponents

    device, dtype = torch.device("cpu"), torch.float32
    ledger = ModelLedger(
        dtype=dtype, device=device, checkpoint_path=str(main), spatial_upsampler_path=str(upsampler), loras=()
    )
    components = PipelineComponents(dtype=dtype, device=device)
    images = [] if image is None else [ImageConditioningInput(str(image), 0, strength)]

    # ---- DistilledPipeline.__call__ ----
    assert_resolution(height=height, width=width, is_two_stage=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    noiser = GaussianNoiser(generator=generator)
    stepper = EulerDiffusionStep()

    with official_tiny_gemma():  # encode_prompts: Gemma, then the embeddings processor (both sized by the patch)
        hidden, mask = official_text_encoder(gemma).encode(prompt)
        ctx_p = ledger.gemma_embeddings_processor().process_hidden_states(hidden, mask)
    video_context, audio_context = ctx_p.video_encoding, ctx_p.audio_encoding

    video_encoder = ledger.video_encoder()
    transformer = ledger.transformer()
    stage_1_sigmas = torch.Tensor(stage_1_sigmas or DISTILLED_SIGMA_VALUES).to(device)
    first_states = []

    def denoising_loop(
        sigmas: torch.Tensor, video_state: LatentState, audio_state: LatentState, stepper: EulerDiffusionStep
    ) -> tuple[LatentState, LatentState]:
        first_states.append(video_state.latent.clone())
        return euler_denoising_loop(
            sigmas=sigmas,
            video_state=video_state,
            audio_state=audio_state,
            stepper=stepper,
            denoise_fn=simple_denoising_func(
                video_context=video_context, audio_context=audio_context, transformer=transformer
            ),
        )

    stage_1_output_shape = VideoPixelShape(
        batch=1, frames=num_frames, width=width // 2, height=height // 2, fps=frame_rate
    )
    stage_1_conditionings = combined_image_conditionings(
        images=images,
        height=stage_1_output_shape.height,
        width=stage_1_output_shape.width,
        video_encoder=video_encoder,
        dtype=dtype,
        device=device,
    )
    video_state, audio_state = denoise_audio_video(
        output_shape=stage_1_output_shape,
        conditionings=stage_1_conditionings,
        noiser=noiser,
        sigmas=stage_1_sigmas,
        stepper=stepper,
        denoising_loop_fn=denoising_loop,
        components=components,
        dtype=dtype,
        device=device,
    )
    upscaled_video_latent = upsample_video(
        latent=video_state.latent[:1], video_encoder=video_encoder, upsampler=ledger.spatial_upsampler()
    )

    stage_2_sigmas = torch.Tensor(stage_2_sigmas or STAGE_2_DISTILLED_SIGMA_VALUES).to(device)
    stage_2_output_shape = VideoPixelShape(batch=1, frames=num_frames, width=width, height=height, fps=frame_rate)
    stage_2_conditionings = combined_image_conditionings(
        images=images,
        height=stage_2_output_shape.height,
        width=stage_2_output_shape.width,
        video_encoder=video_encoder,
        dtype=dtype,
        device=device,
    )
    video_state, audio_state = denoise_audio_video(
        output_shape=stage_2_output_shape,
        conditionings=stage_2_conditionings,
        noiser=noiser,
        sigmas=stage_2_sigmas,
        stepper=stepper,
        denoising_loop_fn=denoising_loop,
        components=components,
        dtype=dtype,
        device=device,
        noise_scale=stage_2_sigmas[0],
        initial_video_latent=upscaled_video_latent,
        initial_audio_latent=audio_state.latent,
    )

    decoded_video = vae_decode_video(video_state.latent, ledger.video_decoder(), None, generator)
    decoded_audio = vae_decode_audio(audio_state.latent, ledger.audio_decoder(), ledger.vocoder())
    frames = torch.cat(list(decoded_video))
    return OfficialOutput(frames, decoded_audio.waveform, decoded_audio.sampling_rate, first_states[0])


# --------------------------------------------------------------------------------------------------------------
# a tiny random release as both sides see it


class TinyRelease(NamedTuple):
    root: Path
    main: Path  # official-format checkpoint (every stage but the upsampler)
    upsampler: Path
    gemma: Path  # tiny Gemma folder (weights + sentencepiece tokenizer.model)
    tokenizer: Path  # the engine directory's tokenizer/ folder (see `export_tokenizer`)
    image: Path  # a 150x100 PNG: other aspect ratio than the profile, so cover + crop matter
    checkpoint: object  # fvrt LTXCheckpoint loaded from main/upsampler/gemma (fp32)


def export_tokenizer(gemma: Path, out: Path) -> Path:
    """What an engine directory's tokenizer/ holds: the Gemma tokenizer as transformers loads it for the official
    `LTXVGemmaTokenizer`, saved with `save_pretrained` (tokenizer.json + tokenizer_config.json)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gemma), local_files_only=True).save_pretrained(str(out))
    return out


def write_test_image(path: Path, height: int = 100, width: int = 150, seed: int = 0) -> Path:
    """A smooth gradient plus noise (so the H.264 round trip and the resize both change it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def tiny_release(root: Path, version: object) -> TinyRelease:
    from test_engines import tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny_checkpoint(root, version)
    return TinyRelease(
        root,
        root / "main.safetensors",
        root / "up.safetensors",
        root / "gemma",
        export_tokenizer(root / "gemma", root / "tokenizer"),
        write_test_image(root / "image.png"),
        checkpoint,
    )
