# Ported from ltx_pipelines/distilled.py (DistilledPipeline.__call__) and ltx_pipelines/utils/helpers.py
# (denoise_audio_video, simple_denoising_func; ltx-pipelines 1.0.0)
"""The distilled two-stage text/image-to-audio+video pipeline over an `EngineSet`.

Stage 1 denoises video (at half height and width) and audio jointly over the preset's stage-1 sigmas; the video
latent is upsampled x2; video and audio are re-noised at the first stage-2 sigma and refined over the stage-2
sigmas; then video and audio are decoded. With an image, its latent replaces latent frame 0 in both stages
(re-encoded at each stage's size) with denoise mask 1 - strength. Same seed and inputs give the official
pipeline's noise (see `sampler`). Only engines are called; nothing here imports model code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fvrt.runtime.conditioning import image_input, read_image
from fvrt.runtime.graphs import GraphRunner
from fvrt.runtime.hostmem import to_host
from fvrt.runtime.media import rgb_to_yuv420p
from fvrt.runtime.protocol import EngineSet
from fvrt.runtime.sampler import (
    PRESETS,
    LatentState,
    Schedule,
    add_noise,
    denoised,
    draw_noise,
    euler_step,
    initial_state,
    schedule,
    token_timesteps,
)
from fvrt.runtime.shapes import (
    AUDIO_CHANNELS,
    AUDIO_MEL_BINS,
    LATENT_CHANNELS,
    TEXT_KEY,
    TWO_STAGE_MULTIPLE,
    VIDEO_SPACE_STRIDE,
    VIDEO_TIME_STRIDE,
    Profile,
)

DEFAULT_SEED = 10  # ltx_pipelines/utils/constants.py PipelineParams.seed
# the seeds torch.Generator.manual_seed accepts (negative ones wrap modulo 2**64), which is how the official
# pipeline seeds its generator: the official range
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# `dit_prep` outputs the video fields then the audio fields, each in `StreamInputs` order (adaln, timestep_index,
# embedded, ...): the output head needs each stream's embedded timestep and per-token index.
FIELD_INDEX, FIELD_EMBEDDED = 1, 2
LTX2_OUTPUT_SAMPLING_RATE = 24000  # ltx-core `_vocoder_from_config` default; the 19B metadata does not carry it

Progress = Callable[[str, int, int], None]  # (stage, steps done, steps in the stage)
DiTPassHook = Callable[..., None]  # (shape key, *the DiT pass's inputs): see `Pipeline.__init__`


@dataclass(frozen=True)
class Request:
    """One generation. height/width/frames/fps must be one of the engines' profiles (static shapes)."""

    prompt: str
    height: int
    width: int
    frames: int
    fps: float
    seed: int = DEFAULT_SEED
    preset: str = "distilled"
    image: Path | None = None
    image_strength: float = 1.0


class Output(NamedTuple):
    frames: np.ndarray | None  # [F, H, W, 3] uint8 (None when the call asked for no frames)
    audio: np.ndarray | None  # [2, S] float32 in about [-1, 1] (None when the call asked for no decode)
    sample_rate: int
    fps: float
    timings: dict[str, float]  # seconds per stage


def audio_sample_rate(config: dict[str, Any]) -> int:
    """The vocoder's output rate from the checkpoint config: 48 kHz (2.3, BWE section) or 24 kHz (19B)."""
    vocoder = config["vocoder"]
    if "bwe" in vocoder:
        return int(vocoder["bwe"]["output_sampling_rate"])
    return int(vocoder.get("output_sampling_rate", LTX2_OUTPUT_SAMPLING_RATE))


def patchify_video(latent: torch.Tensor) -> torch.Tensor:
    """[1, C, F, H, W] -> tokens [1, F*H*W, C] (VideoLatentPatchifier(1))."""
    return latent.flatten(2).transpose(1, 2)


def unpatchify_video(tokens: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *shape)


def patchify_audio(latent: torch.Tensor) -> torch.Tensor:
    """[1, C, T, M] -> tokens [1, T, C*M] (AudioPatchifier(1), channel-major)."""
    return latent.permute(0, 2, 1, 3).flatten(2)


def unpatchify_audio(tokens: torch.Tensor) -> torch.Tensor:
    b, t, _ = tokens.shape
    return tokens.view(b, t, AUDIO_CHANNELS, AUDIO_MEL_BINS).permute(0, 2, 1, 3)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoder output [1, 3, F, H, W] in about [-1, 1] -> [F, H, W, 3] uint8 on its device (official
    `convert_to_uint8`)."""
    frames = (((video + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return frames[0].permute(1, 2, 3, 0)


def validate_request(req: Request, profiles: dict[str, dict[str, Any]]) -> str:
    """Check a request before any work; raises ValueError naming the flag, the value and the rule. Returns the
    name of the engine profile (static shape) it runs on. `profiles`: name -> {"height", "width", "frames", "fps"}.
    """
    if not req.prompt.strip():
        raise ValueError("--prompt: the prompt is empty")
    check_seed(req.seed)
    if req.frames < 1 or (req.frames - 1) % VIDEO_TIME_STRIDE:
        raise ValueError(f"--frames {req.frames}: must be 8k+1 (9, 17, ..., 121)")
    for flag, value in (("--height", req.height), ("--width", req.width)):
        if value <= 0 or value % TWO_STAGE_MULTIPLE:
            raise ValueError(f"{flag} {value}: must be a positive multiple of {TWO_STAGE_MULTIPLE}")
    if req.preset not in PRESETS:
        raise ValueError(f"--preset {req.preset}: must be one of {', '.join(PRESETS)}")
    if not 0.0 <= req.image_strength <= 1.0:
        raise ValueError(f"--image-strength {req.image_strength}: must be in [0, 1]")
    shape = (req.height, req.width, req.frames, float(req.fps))
    built = {n: (p["height"], p["width"], p["frames"], float(p["fps"])) for n, p in profiles.items()}
    names = [n for n, s in built.items() if s == shape]
    if not names:
        have = "; ".join(f"{n}: {h}x{w}x{f} @ {r:g} fps" for n, (h, w, f, r) in built.items())
        raise ValueError(
            f"--height/--width/--frames/--fps {req.height}x{req.width}x{req.frames} @ {req.fps:g} fps: "
            f"the engines were not built for this shape (built: {have})"
        )
    if req.image is not None:
        read_image(req.image)
    return names[0]


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Refuse a seed outside the official range (torch.Generator.manual_seed's)."""
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"{flag} {seed}: must be an integer from -2**63 to 2**64-1 (torch.Generator's seed range)")


# The engines a generation runs, in pipeline order; the DiT block engines are any whose name is BLOCK_PREFIX or
# starts with it (one per layer group, e.g. bf16 and FP8 blocks). video_encoder runs only for an image.
PIPELINE_ENGINES = ("text_in", "text_block", "text_out", "dit_prep", "dit_in", "dit_out", "upsampler")
PIPELINE_ENGINES += ("video_decoder", "audio_decoder")
IMAGE_ENGINES = ("video_encoder",)
BLOCK_PREFIX = "dit_block"
# Every engine some generation needs (one with a conditioning image), the DiT blocks as BLOCK_PREFIX between
# dit_in and dit_out: what an engine directory holds when nothing was left out of its build.
_DIT_OUT = PIPELINE_ENGINES.index("dit_out")
ALL_ENGINES = (*PIPELINE_ENGINES[:_DIT_OUT], BLOCK_PREFIX, *PIPELINE_ENGINES[_DIT_OUT:], *IMAGE_ENGINES)


def missing_engines(names: Sequence[str], *, image: bool) -> list[str]:
    """The engines a generation (with a conditioning image or not) needs that `names` lacks."""
    have = set(names)
    if any(n.startswith(BLOCK_PREFIX + "_") for n in have):
        have.add(BLOCK_PREFIX)
    return [n for n in ALL_ENGINES if n not in have and (image or n not in IMAGE_ENGINES)]


class _Clock:
    """Stage timings; synchronises the device only at stage boundaries, never inside a step loop."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}
        self.start = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now


MEMORY_POLICIES = ("keep", "phase", "offload")
# the laps of `Output.timings`, in this order (plus "pipeline_total"); the pipeline's order, except that with
# `on_audio` the audio decode runs before the video decode
STAGE_TIMINGS = ("text_encode", "stage_1", "upsample", "stage_2", "video_decode", "frames_out", "audio_decode")
# What a generation spent, inside the stages above, on work a warm one does not do: loading engines at first use,
# parking weights in pinned host memory (its first parking allocates that memory), capturing CUDA graphs
COLD_TIMINGS = ("engine_loads", "weight_parking", "graph_captures")
# Engines run without a CUDA graph: one call each per video, so a graph saves microseconds, while its pool would
# keep the call's peak working memory reserved for good (the 1080p VAE passes: the H100's graph pools held 29.6 GB
# after one prompt, and the parked 24 GB text encoder no longer fit for the next). Eager, that memory returns to
# the allocator's cache, which gives it back when the text encoder needs it.
UNGRAPHED = frozenset({"video_encoder", "video_decoder"})


def run_dit(
    engines: EngineSet, key: str, prep_inputs: Sequence[torch.Tensor], in_inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DiT pass through an engine set: dit_prep (`prep_inputs`: video_t, video_index, audio_t, video_sigma,
    audio_sigma) -> dit_in (`in_inputs`: latents and contexts) -> the block engine x num_layers -> dit_out.
    Returns the video and audio velocities."""
    fields = engines.run("dit_prep", key, *prep_inputs)
    vx, ax, cv, ca = engines.run("dit_in", key, *in_inputs)
    for layer in range(engines.num_layers):
        vx, ax = engines.run_block(key, layer, vx, ax, cv, ca, *fields)
    n = len(fields) // 2
    v, a = engines.run(
        "dit_out",
        key,
        vx,
        ax,
        fields[FIELD_EMBEDDED],
        fields[FIELD_INDEX],
        fields[n + FIELD_EMBEDDED],
        fields[n + FIELD_INDEX],
    )
    return v, a


def run_text_encoder(
    engines: EngineSet, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Prompt tokens -> (video_context, audio_context): text_in -> text_block x Gemma layers (each with the mask
    and rotary tables of its attention kind) -> text_out (all hidden states stacked)."""
    h, *tables = engines.run("text_in", TEXT_KEY, input_ids, attention_mask)
    states = [h]
    for i, k in enumerate(engines.text_layer_kinds):
        h = engines.run_text_layer(i, h, *tables[3 * k : 3 * k + 3])
        states.append(h)
    return engines.run("text_out", TEXT_KEY, torch.stack(states), attention_mask)


class Pipeline:
    """`Pipeline(engines, tokenizer)(request)` -> `Output`. `tokenizer(prompt)` gives (ids, mask) [1, 1024]."""

    def __init__(
        self,
        engines: EngineSet,
        tokenizer: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
        *,
        cuda_graphs: bool = True,
        memory: str = "keep",
        prefetch_text: bool = False,
        on_dit_pass: DiTPassHook | None = None,
    ) -> None:
        """memory: "keep" leaves every engine loaded (repeated generations, benchmarks); "phase" releases each
        engine after its last use in a generation (text encoder after encoding, the DiT, upsampler and video
        encoder before the video decode, each decoder after its decode), so the peak is the largest phase,
        not the sum (1080p bf16: 12B text encoder + 19B DiT + the 1080p decode would not fit 80 GB together);
        the next generation loads them again; "offload" keeps every engine loaded except the text encoder, whose
        weights wait in pinned host memory between prompts (copied back, ~1 s for 22 GiB, before each encode):
        1080p bf16 then fits 80 GB without reloading anything from disk.
        prefetch_text (with "offload"): at the end of each generation, start copying the text encoder back
        (asynchronous, on the stream), so that the copy overlaps whatever the caller does next (muxing the MP4,
        waiting for the next prompt) instead of opening the next generation; the device then holds the text
        encoder between prompts, never during the DiT or the decoders. For a process serving prompts one after
        another; a one-shot run gains nothing.
        on_dit_pass(key, video, audio, video_context, audio_context, video_t, video_index, sigma): called with the
        inputs of every DiT pass before it runs (shape key, latents, contexts, [1, 2] timestep values, per-token
        index, sigma [1]); the pipeline reuses these buffers, so a caller keeping them clones them (the builder's
        calibration records the passes of real pipeline runs this way)."""
        if memory not in MEMORY_POLICIES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_POLICIES)}, got {memory!r}")
        self.memory, self.prefetch_text, self.on_dit_pass = memory, prefetch_text, on_dit_pass
        self.engines, self.tokenizer = engines, tokenizer
        self.graphs = GraphRunner(engines.device, enabled=cuda_graphs)
        self.sample_rate = audio_sample_rate(engines.config)

    @torch.no_grad()
    def __call__(
        self,
        req: Request,
        *,
        progress: Progress | None = None,
        on_video: Callable[[np.ndarray], None] | None = None,
        on_audio: Callable[[np.ndarray], None] | None = None,
        frames: bool = True,
        decode: bool = True,
    ) -> Output:
        """Generate. `progress(stage, done, total)` is called per stage and per step; `on_video(planes)` gets
        the decoded frames as yuv420p planes [F, 3H/2, W] uint8 (`media.rgb_to_yuv420p`, converted on the
        device) as soon as they are decoded, so the caller can start encoding them. Without `on_audio` the audio
        is decoded last, after the frames' hand-over; with it, the audio is decoded first (before the video
        decoder runs) and `on_audio(samples)` gets the waveform [2, S] float32 (the array `Output.audio` holds), so
        the caller can encode it while the video decodes. The output is the same either way. frames=False: no RGB
        frames in the output (`Output.frames` None), which skips their host copy (0.76 GB at 1080p): an MP4 needs
        only the planes. decode=False: stop after the last DiT pass, decoding nothing (`Output.frames` and `audio`
        None)."""
        name = validate_request(req, self.engines.profiles)
        progress = progress or (lambda *_: None)
        spent_before = (*self._engine_seconds(), self.graphs.capture_seconds)
        dev, dtype = self.engines.device, self.engines.dtype
        preset, clock = PRESETS[req.preset], _Clock(dev)
        profile = Profile(name, req.height, req.width, req.frames, float(req.fps))
        shape_1, shape_2, audio_tokens = profile.latent(1), profile.latent(2), profile.audio_latents

        # Prompt -> 1024 tokens -> video and audio contexts (no negative prompt: the distilled model runs CFG 1)
        ids, mask = self.tokenizer(req.prompt)
        encode = partial(run_text_encoder, self.engines)
        context = tuple(t.clone() for t in self.graphs(("text_encoder", TEXT_KEY), encode, ids.to(dev), mask.to(dev)))
        self._release("text_encoder")
        clock.lap("text_encode")
        progress("text encode", 1, 1)

        # Stage 1 at half resolution; noise: video, then audio, from one generator (official draw order)
        generator = torch.Generator(device=dev).manual_seed(req.seed)
        key = profile.key(1)
        video = initial_state(
            torch.zeros(1, int(np.prod(shape_1)), LATENT_CHANNELS, device=dev, dtype=dtype),
            self._image_tokens(req, key, shape_1),
            req.image_strength,
        )
        video = add_noise(video, draw_noise(video, generator), 1.0)
        audio = initial_state(torch.zeros(1, audio_tokens, LATENT_CHANNELS, device=dev, dtype=dtype))
        audio = add_noise(audio, draw_noise(audio, generator), 1.0)
        video, audio = self._denoise(
            "stage 1", key, schedule(preset.stage_1, dev), video, audio, context, req, progress, shape_1
        )
        clock.lap("stage_1")

        # x2 latent upsampling (un-normalise, upsample, re-normalise inside the engine)
        (upsampled,) = self._run("upsampler", name, unpatchify_video(video.latent, shape_1))
        upsampled = patchify_video(upsampled)
        clock.lap("upsample")
        progress("upsample", 1, 1)

        # Stage 2 at full resolution: image re-encoded at full size; video and audio re-noised at sigma_0
        key, sched = profile.key(2), schedule(preset.stage_2, dev)
        video = initial_state(upsampled, self._image_tokens(req, key, shape_2), req.image_strength)
        video = add_noise(video, draw_noise(video, generator), sched.sigma[0])  # official noise_scale=sigmas[0]
        audio = initial_state(audio.latent)
        audio = add_noise(audio, draw_noise(audio, generator), sched.sigma[0])
        video, audio = self._denoise("stage 2", key, sched, video, audio, context, req, progress, shape_2)
        self._release("dit", "upsampler", "video_encoder")
        clock.lap("stage_2")
        if not decode:
            return Output(None, None, self.sample_rate, float(req.fps), clock.times)

        # Decode: the waveform at the vocoder's rate first when the caller takes it (handed over at once), then the
        # frames to uint8 (handed over at once), then the waveform if not decoded yet
        if on_audio is not None:
            samples = self._decode_audio(name, audio.latent)
            on_audio(samples)
            clock.lap("audio_decode")
            progress("audio decode", 1, 1)
        (decoded,) = self._run("video_decoder", name, unpatchify_video(video.latent, shape_2))
        clock.lap("video_decode")
        rgb = to_uint8(decoded)
        del decoded
        self._release("video_decoder")
        if on_video is not None:
            on_video(to_host(rgb_to_yuv420p(rgb)).numpy())
        pixels = to_host(rgb).numpy() if frames else None
        del rgb
        clock.lap("frames_out")
        progress("video decode", 1, 1)
        if on_audio is None:
            samples = self._decode_audio(name, audio.latent)
            clock.lap("audio_decode")
            progress("audio decode", 1, 1)
        times = {k: clock.times[k] for k in STAGE_TIMINGS}  # the same order whichever decode ran first
        times["pipeline_total"] = time.perf_counter() - clock.start
        spent = (*self._engine_seconds(), self.graphs.capture_seconds)
        times.update({k: a - b for k, a, b in zip(COLD_TIMINGS, spent, spent_before, strict=True)})
        if self.prefetch_text and self.memory == "offload":  # queued copies: the next prompt's kernels wait for them
            self.engines.onload(["text_encoder"])
        return Output(pixels, samples, self.sample_rate, float(req.fps), times)

    # ---- helpers --------------------------------------------------------------------------------------------

    def _engine_seconds(self) -> tuple[float, float]:
        """(loading, parking) seconds the engine set has spent so far."""
        return self.engines.seconds["load"], self.engines.seconds["park"]

    def _decode_audio(self, name: str, latent: torch.Tensor) -> np.ndarray:
        """Audio tokens -> the waveform [2, S] float32 on the host; the audio decoder is released after it."""
        (waveform,) = self._run("audio_decoder", name, unpatchify_audio(latent))
        samples = waveform[0].float().cpu().numpy()
        self._release("audio_decoder")
        return samples

    def _release(self, *names: str) -> None:
        """memory="phase": drop these engines ("dit" = all DiT engines) and the graphs that call them;
        memory="offload": move the text encoder to host memory (and drop its graph)."""
        if self.memory == "offload" and "text_encoder" in names:
            self.graphs.drop({"text_encoder"})  # a graph replays raw device addresses of the weights
            self.engines.offload(["text_encoder"])
            return
        if self.memory != "phase":
            return
        self.graphs.drop(set(names))  # DiT engines run only inside the ("dit", key) graphs
        self.engines.release(names)

    def _run(self, engine: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One engine call (captured and replayed on CUDA, except UNGRAPHED). Compiled engines read their inputs
        as contiguous buffers, so the (un)patchify views are made contiguous here."""
        inputs = tuple(t.contiguous() for t in inputs)
        if engine in UNGRAPHED:
            return self.engines.run(engine, key, *inputs)
        return self.graphs((engine, key), partial(self.engines.run, engine, key), *inputs)

    def _image_tokens(self, req: Request, key: str, shape: tuple[int, int, int]) -> torch.Tensor | None:
        """The conditioning image encoded at this stage's size, as tokens [1, H'*W', 128] (None without image)."""
        if req.image is None:
            return None
        _, h, w = shape
        pixels = image_input(
            req.image,
            h * VIDEO_SPACE_STRIDE,
            w * VIDEO_SPACE_STRIDE,
            dtype=self.engines.dtype,
            device=self.engines.device,
        )
        (latent,) = self._run("video_encoder", key, pixels)
        return patchify_video(latent)

    def _dit(
        self,
        key: str,
        video: torch.Tensor,
        audio: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
        video_t: torch.Tensor,
        video_index: torch.Tensor,
        sigma: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DiT pass of a denoising step (see `run_dit`). Returns velocities [1, Nv, 128], [1, Na, 128]."""
        prep = (video_t, video_index, sigma.view(1, 1), sigma, sigma)
        if self.on_dit_pass is not None:
            self.on_dit_pass(key, video, audio, video_context, audio_context, video_t, video_index, sigma)
        return run_dit(self.engines, key, prep, (video, audio, video_context, audio_context))

    def _denoise(
        self,
        stage: str,
        key: str,
        sched: Schedule,
        video: LatentState,
        audio: LatentState,
        context: tuple[torch.Tensor, ...],
        req: Request,
        progress: Progress,
        shape: tuple[int, int, int],
    ) -> tuple[LatentState, LatentState]:
        """Joint Euler loop (official `euler_denoising_loop` with `simple_denoising_func`): one DiT pass per step,
        no host synchronisation. The image tokens (latent frame 0, the first H'*W' tokens) get timestep
        (1 - strength) * sigma through the per-token index."""
        dev = self.engines.device
        index = torch.zeros(1, video.latent.shape[1], dtype=torch.int64, device=dev)
        if req.image is not None:
            index[:, : shape[1] * shape[2]] = 1
        cond_mask = torch.tensor(1.0 - req.image_strength, dtype=torch.float32, device=dev)
        video_t = torch.stack([sched.sigma, sched.sigma * cond_mask], dim=-1)  # [S + 1, 2]: sigma, masked sigma
        dit = partial(self._dit, key)
        for i in range(sched.steps):
            sigma = sched.sigma[i]
            inputs = (video.latent, audio.latent, *context, video_t[i : i + 1], index, sched.sigma[i : i + 1])
            v, a = self.graphs(("dit", key), dit, *(t.contiguous() for t in inputs))
            video = euler_step(video, denoised(video, v, token_timesteps(video, sigma)), sched, i)
            audio = euler_step(audio, denoised(audio, a, token_timesteps(audio, sigma)), sched, i)
            progress(stage, i + 1, sched.steps)
        return video, audio
