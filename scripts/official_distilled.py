"""The official implementation's side of `make bench`: ltx-pipelines 1.0.0's `DistilledPipeline.__call__`, stage by
stage and timed, over ltx-core 1.0.0 modules that hold the very weights fvrt built its engines from.

No official checkpoint file is written (at full size it would not fit next to the engines in host memory):
`MemoryLedger` is the official `ModelLedger` with its own builders (configurators, key ops, `build`), whose state
dict loader reads the official-format tensors of fvrt's in-memory stages (`fvrt.builder.checkpoint.
stage_checkpoint_tensors`) instead of a safetensors file. The one stand-in: the Gemma-3 language model inside the
official `GemmaTextEncoder` is the `transformers` `Gemma3TextModel` that fvrt's text stage holds (the same class
the official loader fills; the vision tower and LM head, unused for text, are left uninitialised).

`run` mirrors `DistilledPipeline.__call__` (the prompt encoding of `encode_prompts`, both denoising stages, the
upsampler, `decode_video` with the official CLI's `TilingConfig.default()`, `decode_audio`), builds each model
before its stage as the official code does, and times the compute of every stage separately from the building
of its models (CUDA-synchronised). Official code runs eagerly: no compilation, PyTorch SDPA attention (ltx-core's
default). `encode_mp4` times the official CLI's last step, ltx-pipelines' `encode_video` (PyAV: libx264 yuv420p
and AAC), on the decoded frames and audio.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers  # noqa: F401  (probes for torchaudio once, before the stub below exists)
from torch import nn

if "torchaudio" not in sys.modules:  # ltx-core imports it at module import; only its audio encoder uses it
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")

from ltx_core.loader.primitives import StateDict, StateDictLoader
from ltx_pipelines.utils import ModelLedger

from fvrt.builder.checkpoint import stage_checkpoint_tensors

# ModelLedger builder attribute -> fvrt loader stage
BUILDERS = {
    "transformer_builder": "dit",
    "vae_decoder_builder": "video_decoder",
    "vae_encoder_builder": "video_encoder",
    "audio_decoder_builder": "audio_decoder",
    "vocoder_builder": "vocoder",
    "embeddings_processor_builder": "text_projection",
    "upsampler_builder": "upsampler",
}
STAGES = ("text_encode", "stage_1", "upsample", "stage_2", "video_decode", "audio_decode")


class MemoryLoader(StateDictLoader):
    """`SafetensorsModelStateDictLoader` over in-memory official-format tensors: the official key ops run as on
    a file. `tensors()` is called at load time (a stage's weights exist only while its model is built)."""

    def __init__(self, tensors: Callable[[], dict[str, torch.Tensor]], config: dict[str, Any]) -> None:
        self.tensors, self.config = tensors, config

    def metadata(self, path: str) -> dict:
        return self.config

    def load(self, path: Any, sd_ops: Any = None, device: torch.device | None = None) -> StateDict:
        sd: dict[str, torch.Tensor] = {}
        for name, value in self.tensors().items():
            key = name if sd_ops is None else sd_ops.apply_to_key(name)
            if key is None:
                continue
            value = value.to(device=device) if device is not None else value
            pairs = ((key, value),) if sd_ops is None else sd_ops.apply_to_key_value(key, value)
            sd.update(pairs)
        return StateDict(
            sd=sd,
            device=device or torch.device("cpu"),
            size=sum(v.nbytes for v in sd.values()),
            dtype={v.dtype for v in sd.values()},
        )


class MemoryLedger(ModelLedger):
    """The official ModelLedger over fvrt stages. `stage(name)` returns the fvrt module of a loader stage (built
    on demand: random weights are regenerated from their seed, loaded ones handed over); `gemma()` returns fvrt's
    text encoder (its `.model` is the transformers Gemma3TextModel); `tokenizer_dir` is an engine directory's
    tokenizer folder (what the official `LTXVGemmaTokenizer` reads with AutoTokenizer)."""

    def __init__(
        self,
        *,
        stage: Callable[[str], nn.Module],
        gemma: Callable[[], nn.Module],
        configs: dict[str, dict[str, Any]],
        tokenizer_dir: Path,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._stage, self._gemma, self._configs, self._tokenizer_dir = stage, gemma, configs, tokenizer_dir
        super().__init__(dtype=dtype, device=device, checkpoint_path="<memory>", spatial_upsampler_path="<memory>")

    def build_model_builders(self) -> None:
        super().build_model_builders()
        for attr, name in BUILDERS.items():
            loader = MemoryLoader(self._tensors_of(name), self._configs[name])
            setattr(self, attr, replace(getattr(self, attr), model_loader=loader))

    def _tensors_of(self, name: str) -> Callable[[], dict[str, torch.Tensor]]:
        return lambda: stage_checkpoint_tensors(name, self._stage(name))

    def text_encoder(self) -> nn.Module:
        """The official GemmaTextEncoder (configurator, tokenizer) around fvrt's Gemma3TextModel."""
        from ltx_core.text_encoders.gemma import GemmaTextEncoderConfigurator
        from ltx_core.text_encoders.gemma.tokenizer import LTXVGemmaTokenizer

        encoder = GemmaTextEncoderConfigurator.from_config({})  # Gemma3ForConditionalGeneration on meta
        encoder.model.model.language_model = nn.Module()  # placeholder: to_empty below must not allocate 12B
        encoder.model.to_empty(device=self.device).to(self.dtype)  # vision tower / LM head: unused for text
        encoder.model.model.language_model = self._gemma().model
        encoder.tokenizer = LTXVGemmaTokenizer(str(self._tokenizer_dir), 1024)
        return encoder.eval()


@dataclass
class Timer:
    """Per-stage compute seconds and model build seconds, CUDA-synchronised."""

    device: torch.device
    compute: dict[str, float] = field(default_factory=dict)
    build: dict[str, float] = field(default_factory=dict)
    peak_gpu_GiB: float = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gpu_GiB = max(self.peak_gpu_GiB, torch.cuda.max_memory_allocated(self.device) / 2**30)

    @contextlib.contextmanager
    def __call__(self, table: dict[str, float], name: str) -> Iterator[None]:
        self.sync()
        t = time.perf_counter()
        yield
        self.sync()
        table[name] = table.get(name, 0.0) + time.perf_counter() - t

    def models(self, stage: str, *builders: Callable[[], nn.Module]) -> list[nn.Module]:
        with self(self.build, stage):
            return [b() for b in builders]


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def run(
    ledger: MemoryLedger,
    *,
    prompt: str,
    seed: int,
    height: int,
    width: int,
    num_frames: int,
    frame_rate: float,
    dtype: torch.dtype,
    device: torch.device,
    image: Path | None = None,
    strength: float = 1.0,
    stage_1_sigmas: Sequence[float] | None = None,
    stage_2_sigmas: Sequence[float] | None = None,
    tiled_decode: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int, Timer]:
    """`DistilledPipeline(...)(prompt, seed, height, width, num_frames, frame_rate, images)` over `ledger`, in
    `dtype` on `device`; returns (frames [F, H, W, 3] uint8 on the CPU, audio [2, S], sample rate, Timer)."""
    from ltx_core.components.diffusion_steps import EulerDiffusionStep
    from ltx_core.components.noisers import GaussianNoiser
    from ltx_core.model.audio_vae import decode_audio as vae_decode_audio
    from ltx_core.model.upsampler import upsample_video
    from ltx_core.model.video_vae import TilingConfig
    from ltx_core.model.video_vae import decode_video as vae_decode_video
    from ltx_core.types import LatentState, VideoPixelShape
    from ltx_pipelines.utils import euler_denoising_loop
    from ltx_pipelines.utils.args import ImageConditioningInput
    from ltx_pipelines.utils.constants import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES
    from ltx_pipelines.utils.helpers import (
        assert_resolution,
        combined_image_conditionings,
        denoise_audio_video,
        simple_denoising_func,
    )
    from ltx_pipelines.utils.types import PipelineComponents

    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    components = PipelineComponents(dtype=dtype, device=device)
    images = [] if image is None else [ImageConditioningInput(str(image), 0, strength)]
    assert_resolution(height=height, width=width, is_two_stage=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    noiser = GaussianNoiser(generator=generator)
    stepper = EulerDiffusionStep()

    # encode_prompts: the text encoder, freed, then the embeddings processor
    (text_encoder,) = timer.models("text_encode", ledger.text_encoder)
    with timer(timer.compute, "text_encode"):
        hidden, mask = text_encoder.encode(prompt)
    del text_encoder
    _free(device)
    (processor,) = timer.models("text_encode", ledger.gemma_embeddings_processor)
    with timer(timer.compute, "text_encode"):
        ctx = processor.process_hidden_states(hidden, mask)
    del processor, hidden
    _free(device)
    video_context, audio_context = ctx.video_encoding, ctx.audio_encoding

    video_encoder, transformer = timer.models("stage_1", ledger.video_encoder, ledger.transformer)

    def denoising_loop(
        sigmas: torch.Tensor, video_state: LatentState, audio_state: LatentState, stepper: EulerDiffusionStep
    ) -> tuple[LatentState, LatentState]:
        return euler_denoising_loop(
            sigmas=sigmas,
            video_state=video_state,
            audio_state=audio_state,
            stepper=stepper,
            denoise_fn=simple_denoising_func(
                video_context=video_context,
                audio_context=audio_context,
                transformer=transformer,  # noqa: F821
            ),
        )

    def stage(shape: VideoPixelShape, sigmas: torch.Tensor, **kw: Any) -> tuple[LatentState, LatentState]:
        conditionings = combined_image_conditionings(
            images=images, height=shape.height, width=shape.width, video_encoder=video_encoder,  # noqa: F821
            dtype=dtype, device=device,
        )  # fmt: skip
        return denoise_audio_video(
            output_shape=shape, conditionings=conditionings, noiser=noiser, sigmas=sigmas, stepper=stepper,
            denoising_loop_fn=denoising_loop, components=components, dtype=dtype, device=device, **kw,
        )  # fmt: skip

    s1 = torch.Tensor(stage_1_sigmas or DISTILLED_SIGMA_VALUES).to(device)
    with timer(timer.compute, "stage_1"):
        shape_1 = VideoPixelShape(batch=1, frames=num_frames, width=width // 2, height=height // 2, fps=frame_rate)
        video_state, audio_state = stage(shape_1, s1)
    (upsampler,) = timer.models("upsample", ledger.spatial_upsampler)
    with timer(timer.compute, "upsample"):
        upscaled = upsample_video(latent=video_state.latent[:1], video_encoder=video_encoder, upsampler=upsampler)
    del upsampler
    _free(device)

    s2 = torch.Tensor(stage_2_sigmas or STAGE_2_DISTILLED_SIGMA_VALUES).to(device)
    with timer(timer.compute, "stage_2"):
        shape_2 = VideoPixelShape(batch=1, frames=num_frames, width=width, height=height, fps=frame_rate)
        video_state, audio_state = stage(
            shape_2, s2, noise_scale=s2[0], initial_video_latent=upscaled, initial_audio_latent=audio_state.latent
        )
    del transformer, video_encoder
    _free(device)

    (video_decoder,) = timer.models("video_decode", ledger.video_decoder)
    with timer(timer.compute, "video_decode"):
        tiling = TilingConfig.default() if tiled_decode else None
        frames = torch.cat([f.cpu() for f in vae_decode_video(video_state.latent, video_decoder, tiling, generator)])
    del video_decoder
    _free(device)
    audio_decoder, vocoder = timer.models("audio_decode", ledger.audio_decoder, ledger.vocoder)
    with timer(timer.compute, "audio_decode"):
        audio = vae_decode_audio(audio_state.latent, audio_decoder, vocoder)
        waveform = audio.waveform.float().cpu()
    del audio_decoder, vocoder
    _free(device)
    timer.compute["end_to_end"] = sum(timer.compute[s] for s in STAGES)
    return frames, waveform, int(audio.sampling_rate), timer


def mp4_encoder() -> Callable[..., None]:
    """ltx-pipelines' `encode_video` (raises ImportError where PyAV or the modules it imports are missing)."""
    from ltx_pipelines.utils.media_io import encode_video

    return encode_video


def encode_mp4(frames: torch.Tensor, waveform: torch.Tensor, sample_rate: int, frame_rate: float, path: Path) -> float:
    """What `ltx-pipelines`' distilled CLI does with the pipeline's output: `encode_video(video, fps, Audio,
    output_path, video_chunks_number)`, here on the frames `run` returns ([F, H, W, 3] uint8, CPU) and its
    waveform [2, S]; returns the seconds it took. The CLI decodes its tiles lazily inside this call; `run` has
    timed the decode already, so the two add up to the CLI's decode + encode."""
    from ltx_core.types import Audio

    encode_video = mp4_encoder()
    t = time.perf_counter()
    encode_video(video=frames, fps=int(frame_rate), audio=Audio(waveform, sample_rate), output_path=str(path),
                 video_chunks_number=1)  # fmt: skip
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------------------------
# ltx-core's hard-coded Gemma-3 12B config, swapped for a tiny one (CPU runs at the tiny size)


def tiny_gemma_config_data() -> object:
    """ltx-core's `Gemma3ConfigData` at the tiny sizes of `fvrt.builder.tiny_gemma` (the object the official
    encoder is patched with in place of its hard-coded 12B config)."""
    from ltx_core.text_encoders.gemma.config import Gemma3ConfigData, Gemma3TextConfig, Gemma3VisionConfig

    from fvrt.builder.tiny_gemma import tiny_gemma_config_dict

    ref = tiny_gemma_config_dict()
    text, vision = ref["text_config"], ref["vision_config"]
    text_keys = (
        "head_dim", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "num_hidden_layers", "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern", "vocab_size",
        "max_position_embeddings",
    )  # fmt: skip
    vision_keys = ("hidden_size", "image_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                   "patch_size")  # fmt: skip
    return Gemma3ConfigData(
        boi_token_index=ref["boi_token_index"],
        eoi_token_index=ref["eoi_token_index"],
        image_token_index=ref["image_token_index"],
        eos_token_id=ref["eos_token_id"],
        mm_tokens_per_image=ref["mm_tokens_per_image"],
        torch_dtype="float32",
        text_config=Gemma3TextConfig(**{k: text[k] for k in text_keys}, torch_dtype="float32"),
        vision_config=Gemma3VisionConfig(**{k: vision[k] for k in vision_keys}),
    )


@contextlib.contextmanager
def official_tiny_gemma() -> Iterator[None]:
    """Swap ltx-core's hard-coded Gemma-3 12B config for the tiny one (both modules hold a reference)."""
    import ltx_core.text_encoders.gemma.config as config_module
    import ltx_core.text_encoders.gemma.encoders.encoder_configurator as configurator_module

    tiny = tiny_gemma_config_data()
    saved = [(m, m.GEMMA3_CONFIG_FOR_LTX) for m in (config_module, configurator_module)]
    try:
        for m, _ in saved:
            m.GEMMA3_CONFIG_FOR_LTX = tiny
        yield
    finally:
        for m, old in saved:
            m.GEMMA3_CONFIG_FOR_LTX = old


__all__ = [
    "STAGES",
    "MemoryLedger",
    "MemoryLoader",
    "Timer",
    "encode_mp4",
    "mp4_encoder",
    "official_tiny_gemma",
    "run",
    "tiny_gemma_config_data",
]
