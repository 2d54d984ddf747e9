"""The shape contract between builder and runtime: resolution profiles, latent strides and shape keys.

An engine is compiled for static shapes, one set per *shape key*: "<profile>/s1" and "<profile>/s2" for the
engines of the two pipeline stages (stage 1 at half height and width), "<profile>" for the engines run once per
video (upsampler, decoders), "any" for the text encoder (every prompt is 1024 tokens). The builder derives every
engine's input shapes from a `Profile`; the runtime derives the latent shapes of a request from the same
`Profile`, so both sides agree by construction. Like `manifest.py` this module imports only the standard library.
"""

from __future__ import annotations

from typing import NamedTuple

TEXT_TOKENS = 1024  # the official tokenizer pads/truncates every prompt to 1024 tokens
LATENT_CHANNELS = 128  # video latent channels = DiT token width (video and audio)
AUDIO_CHANNELS, AUDIO_MEL_BINS = 8, 16  # audio latent [1, 8, T, 16] (ltx_core AudioLatentShape defaults)
VIDEO_TIME_STRIDE = 8  # VAE time scale factor: frames 8k+1 -> k+1 latent frames
VIDEO_SPACE_STRIDE = 32  # VAE space scale factor: a latent pixel is 32 x 32 pixels
TWO_STAGE_MULTIPLE = 64  # two-stage pipelines need H, W divisible by 64 (ltx_pipelines helpers.assert_resolution)
AUDIO_LATENTS_PER_SECOND = 25  # audio latent rate: 16 kHz, hop 160, x4 time downsampling
TEXT_KEY = "any"  # the text encoder's one shape key
PIPELINE_STAGES = (1, 2)  # stage 1 at half resolution, stage 2 at full


class Profile(NamedTuple):
    """One output resolution of the two-stage pipeline; stage 1 runs at half height and width."""

    name: str
    height: int
    width: int
    frames: int
    fps: float = 24.0

    def validate(self) -> None:
        if self.height <= 0 or self.width <= 0 or self.height % TWO_STAGE_MULTIPLE or self.width % TWO_STAGE_MULTIPLE:
            raise ValueError(
                f"profile {self.name}: height and width must be positive multiples of {TWO_STAGE_MULTIPLE}, "
                f"got {self.height}x{self.width}"
            )
        if self.frames < 1 or (self.frames - 1) % VIDEO_TIME_STRIDE:
            raise ValueError(f"profile {self.name}: frames must be 8k+1 (9, 17, ..., 121), got {self.frames}")
        if self.fps <= 0:
            raise ValueError(f"profile {self.name}: fps must be positive, got {self.fps}")

    def latent(self, stage: int) -> tuple[int, int, int]:
        """(F', H', W') of the video latent at pipeline stage 1 (half resolution) or 2 (full)."""
        div = VIDEO_SPACE_STRIDE * (2 if stage == 1 else 1)
        return 1 + (self.frames - 1) // VIDEO_TIME_STRIDE, self.height // div, self.width // div

    def video_tokens(self, stage: int) -> int:
        f, h, w = self.latent(stage)
        return f * h * w

    @property
    def audio_latents(self) -> int:
        """round(duration * 25), duration = frames / fps (ltx_core AudioLatentShape.from_video_pixel_shape)."""
        return round(self.frames / self.fps * AUDIO_LATENTS_PER_SECOND)

    def key(self, stage: int | None = None) -> str:
        """This profile's shape key at pipeline stage `stage` (None: the once-per-video engines)."""
        return shape_key(self.name, stage)

    def to_json(self) -> dict[str, int | float]:
        """The manifest's `profiles` entry (everything but the name, which is the key)."""
        return {k: v for k, v in self._asdict().items() if k != "name"}

    @classmethod
    def from_json(cls, name: str, raw: dict[str, int | float]) -> Profile:
        """A manifest `profiles` entry back as a Profile."""
        return cls(name, int(raw["height"]), int(raw["width"]), int(raw["frames"]), float(raw["fps"]))


PRESET_PROFILES: dict[str, Profile] = {
    "1080p": Profile("1080p", 1088, 1920, 121),
    "720p": Profile("720p", 704, 1280, 121),
    "1024x1536": Profile("1024x1536", 1024, 1536, 121),
    "512x768": Profile("512x768", 512, 768, 49),
    "tiny": Profile("tiny", 128, 192, 17),
}


def shape_key(profile: str, stage: int | None = None) -> str:
    """ "1080p", 1 -> "1080p/s1"; "1080p", None -> "1080p"."""
    return profile if stage is None else f"{profile}/s{stage}"


def key_stage(key: str) -> int:
    """The pipeline stage (1 or 2) of a per-stage shape key: "1080p/s2" -> 2."""
    return 1 if key.endswith("/s1") else 2


__all__ = [
    "AUDIO_CHANNELS",
    "AUDIO_LATENTS_PER_SECOND",
    "AUDIO_MEL_BINS",
    "LATENT_CHANNELS",
    "PIPELINE_STAGES",
    "PRESET_PROFILES",
    "TEXT_KEY",
    "TEXT_TOKENS",
    "TWO_STAGE_MULTIPLE",
    "VIDEO_SPACE_STRIDE",
    "VIDEO_TIME_STRIDE",
    "Profile",
    "key_stage",
    "shape_key",
]
