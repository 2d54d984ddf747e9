"""The runtime pipeline against the official distilled pipeline: CPU, fp32, a tiny random release, both model
versions, text-to-video and image-to-video.

fvrt: `fvrt.runtime.pipeline.Pipeline` over the eager engine set (`EagerEngineSet`, the reference every compiled
engine is checked against) and the runtime tokenizer. Official: the same files through ltx-core's loaders, wired
as `DistilledPipeline.__call__` (tests/official_pipeline.py). Acceptance: decoded video PSNR >= 40 dB and audio
SNR >= 30 dB. The pieces are also checked one by one, exactly: initial noise and re-noising, the Euler step,
tokenizer ids and the image-conditioning input.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from official_pipeline import TinyRelease, official_distilled, tiny_release, write_test_image

from fvrt.builder.checkpoint import ModelVersion
from fvrt.builder.eager import EagerEngineSet
from fvrt.builder.engines import PRESET_PROFILES
from fvrt.metrics import psnr, snr
from fvrt.runtime import sampler
from fvrt.runtime.conditioning import ImageError, image_input
from fvrt.runtime.graphs import GraphRunner
from fvrt.runtime.media import rgb_to_yuv420p
from fvrt.runtime.pipeline import COLD_TIMINGS, STAGE_TIMINGS, Output, Pipeline, Request, validate_request
from fvrt.runtime.tokenizer import PromptTokenizer

TINY = PRESET_PROFILES["tiny"]  # 128x192x17: stage-1 latent 3x2x3, stage-2 3x4x6, 18 audio latents
PROMPT = "A cat sits on a red mat while two dogs run along the beach at dawn."
SEED = 3
MIN_PSNR_DB, MIN_SNR_DB = 40.0, 30.0  # the acceptance bar (issue 4)
# Tighter bars: with tiny random weights the prompt moves the video by only ~55 dB PSNR (measured: another prompt
# with the same seed), so the acceptance bar alone would not catch a wrong text path. Measured parity: ~90 dB
# PSNR (a few uint8 steps from fp32 rounding at the conversion) and ~120 dB SNR.
TIGHT_PSNR_DB, TIGHT_SNR_DB = 70.0, 60.0


@pytest.fixture(scope="module", params=[ModelVersion.LTX2, ModelVersion.LTX23], ids=["ltx2", "ltx23"])
def release(request: pytest.FixtureRequest, module_tmp: Callable[[str], Path]) -> TinyRelease:
    return tiny_release(module_tmp(f"release-{request.param.name}"), request.param)


class ContiguousInputs:
    """The eager engine set, refusing non-contiguous inputs that the pipeline makes (compiled engines read raw
    contiguous buffers: AOTInductor misreads a strided view silently). The DiT block and output head get only
    engine outputs (the eager prep engine returns RoPE views; compiled ones return contiguous buffers)."""

    def __init__(self, engines: EagerEngineSet) -> None:
        self.engines = engines
        self.device, self.dtype, self.num_layers = engines.device, engines.dtype, engines.num_layers
        self.config, self.profiles, self.text_layer_kinds = engines.config, engines.profiles, engines.text_layer_kinds
        self.seconds = engines.seconds

    def release(self, names: object = None) -> None:
        self.engines.release(names)  # type: ignore[arg-type]

    def offload(self, names: object) -> None:
        self.engines.offload(names)  # type: ignore[arg-type]

    def onload(self, names: object) -> None:
        self.engines.onload(names)  # type: ignore[arg-type]

    @staticmethod
    def _check(what: str, inputs: tuple[torch.Tensor, ...]) -> None:
        bad = [i for i, t in enumerate(inputs) if not t.is_contiguous()]
        assert not bad, f"{what}: non-contiguous inputs {bad}"

    def run(self, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if name != "dit_out":
            self._check(name, inputs)
        return self.engines.run(name, key, *inputs)

    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engines.run_block(key, layer, *inputs)

    def run_text_layer(self, layer: int, *inputs: torch.Tensor) -> torch.Tensor:
        self._check("text_block", inputs)
        return self.engines.run_text_layer(layer, *inputs)


@pytest.fixture(scope="module")
def pipe(release: TinyRelease) -> Pipeline:
    engines = ContiguousInputs(EagerEngineSet(release.checkpoint, [TINY]))
    return Pipeline(engines, PromptTokenizer(release.tokenizer))


def run_both(
    release: TinyRelease, pipe: Pipeline, *, image: bool, preset: str = "distilled", **hooks: object
) -> tuple[Output, object]:
    img = release.image if image else None
    req = Request(PROMPT, TINY.height, TINY.width, TINY.frames, TINY.fps, seed=SEED, preset=preset, image=img)
    ours = pipe(req, **hooks)
    sigmas = sampler.PRESETS[preset]
    ref = official_distilled(
        release.main,
        release.upsampler,
        release.gemma,
        prompt=PROMPT,
        seed=SEED,
        height=TINY.height,
        width=TINY.width,
        num_frames=TINY.frames,
        frame_rate=TINY.fps,
        image=img,
        stage_1_sigmas=sigmas.stage_1,
        stage_2_sigmas=sigmas.stage_2,
    )
    return ours, ref


def check_parity(ours: Output, ref: object, what: str) -> None:
    """Same shapes and rate, a non-trivial output, and the acceptance bar (plus the tight one)."""
    assert ours.frames.shape == (TINY.frames, TINY.height, TINY.width, 3) and ours.frames.dtype == np.uint8
    assert tuple(ref.frames.shape) == ours.frames.shape
    assert ours.audio.shape == tuple(ref.audio.shape) and ours.audio.shape[0] == 2
    assert ours.sample_rate == ref.sample_rate
    assert ours.frames.std() > 10 and np.abs(ours.audio).max() > 1e-3, "degenerate output proves nothing"
    p, s = psnr(ours.frames, ref.frames.numpy()), snr(ours.audio, ref.audio.numpy())
    print(f"[{what}] video PSNR {p:.1f} dB, audio SNR {s:.1f} dB")
    assert p >= MIN_PSNR_DB and s >= MIN_SNR_DB, (p, s)
    assert p >= TIGHT_PSNR_DB and s >= TIGHT_SNR_DB, (p, s)


# --------------------------------------------------------------------------------------------------------------
# end to end


class GraphKeys:
    """Stands in for the pipeline's GraphRunner and records which engine calls go through it (CUDA graphs)."""

    def __init__(self, runner: object) -> None:
        self.runner, self.names = runner, set()

    def __call__(self, key: tuple, fn: object, *inputs: torch.Tensor) -> object:
        self.names.add(key[0])
        return self.runner(key, fn, *inputs)  # type: ignore[operator]

    def __getattr__(self, name: str) -> object:
        return getattr(self.runner, name)


def test_text_to_video_matches_official(release: TinyRelease, pipe: Pipeline) -> None:
    # Precondition: hooks that record what the caller sees and which calls would be captured in CUDA graphs
    events: list[tuple[str, int, int]] = []
    handed: list[np.ndarray] = []
    runner, pipe.graphs = pipe.graphs, GraphKeys(pipe.graphs)

    # Under test
    try:
        ours, ref = run_both(release, pipe, image=False, progress=lambda *e: events.append(e), on_video=handed.append)
        graphed = pipe.graphs.names
    finally:
        pipe.graphs = runner

    # Postcondition
    check_parity(ours, ref, f"{release.root.name} t2v")
    assert ours.sample_rate == (48000 if "bwe" in pipe.engines.config["vocoder"] else 24000)
    assert list(ours.timings) == [*STAGE_TIMINGS, "pipeline_total", *COLD_TIMINGS]  # every lap, in pipeline order
    assert all(ours.timings[k] == 0 for k in COLD_TIMINGS)  # the eager set counts none; no graphs on the CPU
    assert [e for e in events if e[0].startswith("stage")] == [("stage 1", i, 8) for i in range(1, 9)] + [
        ("stage 2", i, 3) for i in range(1, 4)
    ]
    assert [e[0] for e in events if not e[0].startswith("stage")] == [
        "text encode",
        "upsample",
        "video decode",
        "audio decode",
    ]
    assert len(handed) == 1 and np.array_equal(handed[0], rgb_to_yuv420p(torch.from_numpy(ours.frames)).numpy())
    # the VAE decoder runs outside CUDA graphs (a graph's pool would keep its 1080p working memory for good)
    assert graphed == {"text_encoder", "dit", "upsampler", "audio_decoder"}, graphed


def test_without_frames_the_mp4_planes_are_the_same(release: TinyRelease, pipe: Pipeline) -> None:
    """frames=False (fvrt-run without --raw): no RGB frames in the output, the same yuv420p planes and audio."""
    req = Request(PROMPT, TINY.height, TINY.width, TINY.frames, TINY.fps, seed=SEED, preset="realtime")
    with_frames: list[np.ndarray] = []
    without: list[np.ndarray] = []
    full = pipe(req, on_video=with_frames.append)
    lean = pipe(req, on_video=without.append, frames=False)
    assert full.frames is not None and lean.frames is None
    assert np.array_equal(without[0], with_frames[0]) and np.array_equal(lean.audio, full.audio)
    assert np.array_equal(with_frames[0], rgb_to_yuv420p(torch.from_numpy(full.frames)).numpy())


def test_image_to_video_matches_official(release: TinyRelease, pipe: Pipeline) -> None:
    ours, ref = run_both(release, pipe, image=True)
    check_parity(ours, ref, f"{release.root.name} i2v")


def test_realtime_preset_matches_official_wiring(tmp_path: Path) -> None:
    """5 + 2 steps through the same official wiring with the realtime sigmas (the schedule does not depend on the
    model version; the cheaper LTX-2 release is enough)."""
    release = tiny_release(tmp_path, ModelVersion.LTX2)
    pipe = Pipeline(EagerEngineSet(release.checkpoint, [TINY]), PromptTokenizer(release.tokenizer))
    events: list[tuple[str, int, int]] = []
    ours, ref = run_both(release, pipe, image=True, preset="realtime", progress=lambda *e: events.append(e))
    check_parity(ours, ref, "ltx2 i2v realtime")
    assert [e[2] for e in events if e[0] == "stage 1"] == [5] * 5
    assert [e[2] for e in events if e[0] == "stage 2"] == [2] * 2


# --------------------------------------------------------------------------------------------------------------
# pieces, exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_draws_match_official(dtype: torch.dtype) -> None:
    """Stage 1 (zeros + image tokens, scale 1) then stage 2 (upsampled latent, scale sigma_0), video then audio,
    from one generator: the official `noise_video_state` / `noise_audio_state` give the same tensors bit for bit."""
    from ltx_core.components.noisers import GaussianNoiser
    from ltx_core.conditioning import VideoConditionByLatentIndex
    from ltx_core.types import VideoPixelShape
    from ltx_pipelines.utils.helpers import noise_audio_state, noise_video_state
    from ltx_pipelines.utils.types import PipelineComponents

    cpu, strength = torch.device("cpu"), 0.7
    gen = torch.Generator().manual_seed(0)
    cond = {s: torch.randn(1, 128, 1, *TINY.latent(s)[1:], generator=gen).to(dtype) for s in (1, 2)}
    upsampled = torch.randn(1, 128, *TINY.latent(2), generator=gen).to(dtype)
    audio_1 = torch.randn(1, 8, TINY.audio_latents, 16, generator=gen).to(dtype)
    comp = PipelineComponents(dtype=dtype, device=cpu)

    def official(stage: int, noiser: GaussianNoiser) -> tuple[torch.Tensor, ...]:
        h, w = (TINY.height // 2, TINY.width // 2) if stage == 1 else (TINY.height, TINY.width)
        shape = VideoPixelShape(batch=1, frames=TINY.frames, width=w, height=h, fps=TINY.fps)
        kw = {"noise_scale": torch.Tensor([0.909375])[0]} if stage == 2 else {}  # as `stage_2_sigmas[0]`
        v, _ = noise_video_state(
            shape, noiser, [VideoConditionByLatentIndex(cond[stage], strength, 0)], comp, dtype, cpu,
            initial_latent=upsampled if stage == 2 else None, **kw,
        )  # fmt: skip
        a, _ = noise_audio_state(
            shape, noiser, [], comp, dtype, cpu, initial_latent=audio_1 if stage == 2 else None, **kw
        )
        return v.latent, v.clean_latent, v.denoise_mask, a.latent

    noiser = GaussianNoiser(torch.Generator(device=cpu).manual_seed(SEED))
    ref = [official(1, noiser), official(2, noiser)]

    gen = torch.Generator(device=cpu).manual_seed(SEED)
    ours = []
    for stage, scale in ((1, 1.0), (2, torch.tensor(0.909375))):
        f, h, w = TINY.latent(stage)
        base = upsampled.flatten(2).transpose(1, 2) if stage == 2 else torch.zeros(1, f * h * w, 128, dtype=dtype)
        video = sampler.initial_state(base, cond[stage].flatten(2).transpose(1, 2), strength)
        video = sampler.add_noise(video, sampler.draw_noise(video, gen), scale)
        a0 = (
            audio_1.permute(0, 2, 1, 3).flatten(2)
            if stage == 2
            else torch.zeros(1, TINY.audio_latents, 128, dtype=dtype)
        )
        audio = sampler.initial_state(a0)
        audio = sampler.add_noise(audio, sampler.draw_noise(audio, gen), scale)
        ours.append((video.latent, video.clean, video.mask, audio.latent))

    for stage in range(2):
        for name, a, b in zip(("video", "clean", "mask", "audio"), ours[stage], ref[stage], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), f"stage {stage + 1} {name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_matches_official(dtype: torch.dtype) -> None:
    """x0 from the velocity, the blend with clean tokens and the Euler update equal the official functions."""
    from ltx_core.components.diffusion_steps import EulerDiffusionStep
    from ltx_core.utils import to_denoised
    from ltx_pipelines.utils.helpers import post_process_latent

    gen = torch.Generator().manual_seed(1)
    x, v, clean = (torch.randn(1, 40, 128, generator=gen).to(dtype) for _ in range(3))
    mask = torch.ones(1, 40, 1)
    mask[:, :8] = 0.25
    sched = sampler.schedule(sampler.DISTILLED_SIGMAS, torch.device("cpu"))
    sigmas = torch.Tensor(sampler.DISTILLED_SIGMAS)
    state = sampler.LatentState(x, clean, mask)
    for step in range(sched.steps):
        t = mask * sigmas[step]
        ref_x0 = post_process_latent(to_denoised(state.latent, v, t), mask, clean)
        ref = EulerDiffusionStep().step(state.latent, ref_x0, sigmas, step)
        x0 = sampler.denoised(state, v, sampler.token_timesteps(state, sched.sigma[step]))
        assert torch.equal(x0, ref_x0), step
        state = sampler.euler_step(state, x0, sched, step)
        assert state.latent.dtype == dtype and torch.equal(state.latent, ref), step


def test_realtime_schedule_is_the_published_subset() -> None:
    """REALTIME_SIGMAS is FastVideo's `_distilled_subset_sigmas(5)` of the official 8-step schedule (both ends
    kept; interior chosen to minimise (largest gap, last gap, sum of squared gaps)); stage 2 drops 0.725."""
    d = sampler.DISTILLED_SIGMAS
    best = min(
        ((0, *inner, len(d) - 1) for inner in itertools.combinations(range(1, len(d) - 1), 4)),
        key=lambda idx: (
            max(d[a] - d[b] for a, b in itertools.pairwise(idx)),
            d[idx[-2]] - d[idx[-1]],
            sum((d[a] - d[b]) ** 2 for a, b in itertools.pairwise(idx)),
        ),
    )
    assert tuple(d[i] for i in best) == sampler.REALTIME_SIGMAS
    assert tuple(s for s in sampler.STAGE_2_SIGMAS if s != 0.725) == sampler.REALTIME_STAGE_2_SIGMAS
    assert sampler.PRESETS["realtime"].stage_2[0] == sampler.PRESETS["distilled"].stage_2[0] == 0.909375


def test_tokenizer_matches_official(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ltx_core.text_encoders.gemma.tokenizer import LTXVGemmaTokenizer
    from official_pipeline import export_tokenizer

    from fvrt.builder.tiny_gemma import write_tiny_gemma

    gemma = write_tiny_gemma(tmp_path / "gemma")
    ours = PromptTokenizer(export_tokenizer(gemma, tmp_path / "tokenizer"))
    official = LTXVGemmaTokenizer(str(gemma), 1024)
    prompts = [
        PROMPT,
        "  leading and trailing whitespace, \t tabs and\nnewlines  ",
        "Ünïcödé ⅷ ﬁne — “quotes” 日本語 🙂",
        "x",
        " ".join(["a red cat and a blue dog"] * 300),  # > 1024 tokens: truncated on the right
    ]
    for prompt in prompts:
        ids, mask = ours(prompt)
        ref = official.tokenize_with_weights(prompt)["gemma"]
        assert ids.shape == mask.shape == (1, 1024) and ids.dtype == mask.dtype == torch.int64
        assert ids[0].tolist() == [int(t) for t, _ in ref], prompt[:40]
        assert mask[0].tolist() == [int(m) for _, m in ref], prompt[:40]
    assert "only the first 1024 are used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ours(PROMPT)
    assert not caplog.records


@pytest.mark.parametrize("kind", ["png", "jpeg", "rgba", "odd"])
def test_image_input_matches_official(tmp_path: Path, kind: str) -> None:
    from ltx_pipelines.utils.media_io import load_image_conditioning
    from PIL import Image

    size = {"odd": (77, 131)}.get(kind, (100, 150))
    path = write_test_image(tmp_path / "img.png", *size)
    if kind in ("jpeg", "rgba"):
        img = Image.open(path)
        path = tmp_path / ("img.jpg" if kind == "jpeg" else "img_rgba.png")
        (img.convert("RGBA") if kind == "rgba" else img).save(path)
    for h, w in ((64, 96), (128, 192)):
        ours = image_input(path, h, w, dtype=torch.float32, device=torch.device("cpu"))
        ref = load_image_conditioning(str(path), h, w, torch.float32, torch.device("cpu"))
        assert ours.shape == (1, 3, 1, h, w) and torch.equal(ours, ref), (kind, h, w)


def test_image_is_decoded_once_per_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validating a request and encoding its image at both stages' sizes decode the file once; a changed file is
    decoded again."""
    from fvrt.runtime import conditioning

    decoded: list[str] = []
    decode = conditioning._decode
    monkeypatch.setattr(conditioning, "_decode", lambda p: decoded.append(p) or decode(p))
    conditioning._decoded.cache_clear()
    path = write_test_image(tmp_path / "img.png", 100, 150)
    validate_request(Request(PROMPT, 128, 192, 17, 24.0, image=path), {"tiny": TINY._asdict()})
    for h, w in ((64, 96), (128, 192)):
        image_input(path, h, w, dtype=torch.float32, device=torch.device("cpu"))
    assert decoded == [str(path)]
    write_test_image(path, 80, 150)
    assert image_input(path, 64, 96, dtype=torch.float32, device=torch.device("cpu")).shape == (1, 3, 1, 64, 96)
    assert decoded == [str(path), str(path)]


def test_request_validation(tmp_path: Path) -> None:
    profiles = {"tiny": {"height": 128, "width": 192, "frames": 17, "fps": 24.0}}

    def check(match: str, **kw: object) -> None:
        args = {"prompt": PROMPT, "height": 128, "width": 192, "frames": 17, "fps": 24.0, **kw}
        with pytest.raises(ValueError, match=match):
            validate_request(Request(**args), profiles)

    assert validate_request(Request(PROMPT, 128, 192, 17, 24), profiles) == "tiny"
    check("--prompt: the prompt is empty", prompt="  \n")
    check(r"--frames 20: must be 8k\+1", frames=20)
    check("--height 100: must be a positive multiple of 64", height=100)
    check("--width 160: must be a positive multiple of 64", width=160)
    check("not built for this shape .*tiny: 128x192x17 @ 24 fps", frames=25)
    check("not built for this shape", fps=25.0)
    check("--preset fast: must be one of distilled, realtime", preset="fast")
    check(r"--image-strength 1.5: must be in \[0, 1\]", image_strength=1.5)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"--image .*bad.png: cannot read the image"):
        validate_request(Request(PROMPT, 128, 192, 17, 24, image=tmp_path / "bad.png"), profiles)
    with pytest.raises(ImageError, match="cannot read the image"):
        validate_request(Request(PROMPT, 128, 192, 17, 24, image=tmp_path / "missing.png"), profiles)


def test_graph_runner_is_eager_on_cpu() -> None:
    runner = GraphRunner(torch.device("cpu"))
    assert not runner.enabled
    x = torch.randn(4, 4)
    (y,) = runner("f", lambda t: (t @ t,), x)
    assert torch.equal(y, x @ x)


@pytest.mark.gpu
def test_graph_runner_runs_uncapturable_work_eagerly() -> None:
    """A function that synchronises with the host cannot be captured: the key falls back to eager calls (same
    results), the failure is recorded, and other keys still capture."""
    dev = torch.device("cuda")
    runner = GraphRunner(dev)
    x = torch.randn(32, device=dev)
    (y,) = runner("sync", lambda t: (t * float(t.sum().item()),), x)
    assert torch.allclose(y, x * float(x.sum()))
    assert "sync" in next(iter(runner.failures))
    (z,) = runner("sync", lambda t: (t * float(t.sum().item()),), x * 2)
    assert torch.allclose(z, 2 * x * float(2 * x.sum()))
    (w,) = runner("fine", lambda t: (t + 1,), x)
    assert torch.allclose(w, x + 1) and len(runner.failures) == 1


@pytest.mark.gpu
def test_graph_runner_captures_once_and_replays() -> None:
    """On CUDA: one capture per key and input signature; replays follow new inputs; no host sync needed."""
    dev = torch.device("cuda")
    runner = GraphRunner(dev)
    calls: list[int] = []

    def fn(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return torch.relu(a @ b), (a * 2).sum(-1)

    gen = torch.Generator(device=dev).manual_seed(0)
    for i in range(3):
        a, b = (torch.randn(64, 64, device=dev, generator=gen) for _ in range(2))
        out = runner("fn", fn, a, b)
        ref = fn(a, b)
        assert all(torch.allclose(o, r) for o, r in zip(out, ref, strict=True)), i
    assert len(calls) == 3 + 2  # the 3 references + warm-up and capture of the first call only
    runner("fn", fn, torch.randn(32, 64, device=dev), torch.randn(64, 64, device=dev))
    assert len(calls) == 3 + 2 + 2  # a new input shape is a new graph


@pytest.mark.gpu
def test_graph_runner_captures_again_after_every_graph_was_dropped() -> None:
    """The text encoder's graphs are dropped when it is parked, before the DiT's are captured: the shared pool must
    survive its last graph (on the H100 every later capture failed while it did not)."""
    dev = torch.device("cuda")
    runner = GraphRunner(dev)
    x = torch.randn(4096, device=dev)
    assert torch.equal(runner(("text", "any"), lambda a: (a * 2,), x)[0], x * 2)
    runner.drop({"text"})
    for _ in range(2):
        assert torch.equal(runner(("dit", "s1"), lambda a: (a + 1,), x)[0], x + 1)
        runner.clear()
    assert torch.equal(runner(("text", "any"), lambda a: (a * 3,), x)[0], x * 3)
    assert not runner.failures, runner.failures


class Releasing(ContiguousInputs):
    """Records engine runs and releases; an engine run after its release in the same generation is loaded again
    (counted), which memory="phase" must never cause."""

    def __init__(self, engines: EagerEngineSet) -> None:
        super().__init__(engines)
        self.events: list[tuple[str, str]] = []
        self.released: set[str] = set()

    def run(self, name: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        group = "dit" if name.startswith("dit_") else "text_encoder" if name.startswith("text_") else name
        assert group not in self.released, f"{name} ran after it was released"
        self.events.append(("run", group))
        return super().run(name, key, *inputs)

    def run_block(self, key: str, layer: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert "dit" not in self.released, "a DiT block ran after the DiT was released"
        return super().run_block(key, layer, *inputs)

    def run_text_layer(self, layer: int, *inputs: torch.Tensor) -> torch.Tensor:
        assert "text_encoder" not in self.released, "a Gemma layer ran after the text encoder was released"
        return super().run_text_layer(layer, *inputs)

    def offload(self, names: object) -> None:
        self.events.append(("offload", ",".join(sorted(names))))  # type: ignore[arg-type]

    def onload(self, names: object) -> None:
        self.events.append(("onload", ",".join(sorted(names))))  # type: ignore[arg-type]

    def release(self, names: object) -> None:
        self.released |= set(names)  # type: ignore[arg-type]
        self.events.append(("release", ",".join(sorted(names))))  # type: ignore[arg-type]


def test_phase_memory_releases_each_engine_after_its_last_use(release: TinyRelease, pipe: Pipeline) -> None:
    engines = Releasing(EagerEngineSet(release.checkpoint, [TINY]))
    phased = Pipeline(engines, PromptTokenizer(release.tokenizer), memory="phase")
    req = Request(PROMPT, TINY.height, TINY.width, TINY.frames, TINY.fps, seed=SEED, image=release.image)
    got, want = phased(req), pipe(req)
    assert np.array_equal(got.frames, want.frames) and np.array_equal(got.audio, want.audio)
    releases = [e[1] for e in engines.events if e[0] == "release"]
    assert releases == ["text_encoder", "dit,upsampler,video_encoder", "video_decoder", "audio_decoder"]
    engines.released.clear()
    again = phased(req)  # the next generation loads them again
    assert np.array_equal(again.frames, want.frames)
    with pytest.raises(ValueError, match="memory must be one of keep, phase"):
        Pipeline(engines, PromptTokenizer(release.tokenizer), memory="low")


def test_on_audio_hands_the_audio_over_before_the_video_decode(release: TinyRelease, pipe: Pipeline) -> None:
    """on_audio: the audio is decoded (and its decoder released) and handed over before the video decoder runs; the
    output is the one without on_audio, its laps in the same order."""
    # Precondition: a phased pipeline that records engine runs and releases, and callbacks that record the order
    engines = Releasing(EagerEngineSet(release.checkpoint, [TINY]))
    phased = Pipeline(engines, PromptTokenizer(release.tokenizer), memory="phase")
    req = Request(PROMPT, TINY.height, TINY.width, TINY.frames, TINY.fps, seed=SEED, preset="realtime")
    calls: list[tuple[str, np.ndarray, list[tuple[str, str]]]] = []
    events: list[str] = []

    def hand_over(kind: str) -> Callable[[np.ndarray], None]:
        return lambda x: calls.append((kind, x, list(engines.events)))

    # Under test
    got = phased(
        req,
        on_audio=hand_over("audio"),
        on_video=hand_over("video"),
        progress=lambda stage, *_: events.append(stage),
    )

    # Postcondition: audio first (its decoder run and released, the video decoder not yet run), then the video
    planes: list[np.ndarray] = []
    want = pipe(req, on_video=planes.append)
    assert [c[0] for c in calls] == ["audio", "video"]
    (_, samples, before_audio), (_, video_planes, _) = calls
    assert ("run", "audio_decoder") in before_audio and ("run", "video_decoder") not in before_audio
    assert samples is got.audio and samples.dtype == np.float32 and samples.shape[0] == 2
    assert np.array_equal(got.audio, want.audio) and np.array_equal(got.frames, want.frames)
    assert np.array_equal(video_planes, planes[0])
    assert (got.sample_rate, got.fps) == (want.sample_rate, want.fps)
    assert list(got.timings) == list(want.timings) == [*STAGE_TIMINGS, "pipeline_total", *COLD_TIMINGS]
    releases = [e[1] for e in engines.events if e[0] == "release"]
    assert releases == ["text_encoder", "dit,upsampler,video_encoder", "audio_decoder", "video_decoder"]
    decodes = [e for e in events if not e.startswith("stage")]
    assert decodes == ["text encode", "upsample", "audio decode", "video decode"]


def test_offload_memory_parks_only_the_text_encoder(release: TinyRelease, pipe: Pipeline) -> None:
    engines = Releasing(EagerEngineSet(release.checkpoint, [TINY]))
    parked = Pipeline(engines, PromptTokenizer(release.tokenizer), memory="offload")
    req = Request(PROMPT, TINY.height, TINY.width, TINY.frames, TINY.fps, seed=SEED)
    for _ in range(2):
        engines.events.clear()
        got, want = parked(req), pipe(req)
        assert np.array_equal(got.frames, want.frames) and np.array_equal(got.audio, want.audio)
        assert [e for e in engines.events if e[0] != "run"] == [("offload", "text_encoder")]
        first_dit = next(i for i, e in enumerate(engines.events) if e == ("run", "dit"))
        assert engines.events.index(("offload", "text_encoder")) < first_dit  # parked before the DiT runs
    # prefetch_text: the copy back is started once the generation is done (after the last engine ran)
    parked.prefetch_text = True
    engines.events.clear()
    got = parked(req)
    assert np.array_equal(got.frames, want.frames)
    assert [e for e in engines.events if e[0] != "run"] == [("offload", "text_encoder"), ("onload", "text_encoder")]
    assert engines.events[-1] == ("onload", "text_encoder")
