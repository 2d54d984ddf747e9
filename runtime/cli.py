"""`fvrt-run ENGINE_DIR --prompt ...`: generate one MP4 (video + audio) with a built engine directory.

A thin click wrapper: options -> `Request` -> checks -> `Pipeline` -> files. Everything that can be checked
before work is checked first (the request against the manifest's profiles, the image, the output paths, the
tokenizer, the engine files); each failure is one line on stderr and exit code 2, with nothing written. Shape
defaults come from the manifest: an option left out takes the value of the first built profile that matches the
options given.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import torch

from fvrt.runtime.manifest import read_manifest
from fvrt.runtime.media import Mp4Writer, check_writable, save_raw, write_atomic
from fvrt.runtime.pipeline import (
    DEFAULT_SEED,
    MEMORY_POLICIES,
    STAGE_TIMINGS,
    Output,
    Pipeline,
    Request,
    validate_request,
)
from fvrt.runtime.protocol import EngineSet
from fvrt.runtime.sampler import PRESETS
from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer

PROG = "fvrt-run"
EXIT_USAGE = 2  # bad request, engine directory or output path: nothing was run or written
TIMING_ORDER = ("engine_load", *STAGE_TIMINGS, "mux", "total")


def open_engines(engine_dir: Path, device: str | None) -> EngineSet:
    """The compiled engine directory (verified: sha256 of every file, torch version, device, GPU)."""
    from fvrt.runtime.engine import open_engine_dir

    return open_engine_dir(engine_dir, device=device)


def _fail(message: str) -> NoReturn:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def resolve_shape(
    profiles: dict[str, dict[str, Any]], height: int | None, width: int | None, frames: int | None, fps: float | None
) -> tuple[int, int, int, float]:
    """Fill the shape options left out from the first profile matching those given (or the first profile)."""
    given = {"height": height, "width": width, "frames": frames, "fps": fps}
    for p in profiles.values():
        if all(v is None or float(p[k]) == float(v) for k, v in given.items()):
            return (
                height if height is not None else int(p["height"]),
                width if width is not None else int(p["width"]),
                frames if frames is not None else int(p["frames"]),
                fps if fps is not None else float(p["fps"]),
            )
    # nothing matches: keep the given values (and any profile's for the rest) so validation names the problem
    first = next(iter(profiles.values()), {"height": 0, "width": 0, "frames": 0, "fps": 0.0})
    return (
        height if height is not None else int(first["height"]),
        width if width is not None else int(first["width"]),
        frames if frames is not None else int(first["frames"]),
        fps if fps is not None else float(first["fps"]),
    )


class _Progress:
    """One progress bar per stage on stderr, advanced per step."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = click.progressbar(length=total, label=f"{stage:<13}", file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _report(timings: dict[str, float]) -> str:
    rows = [(k, timings[k]) for k in TIMING_ORDER if k in timings]
    return "\n".join(f"  {k:<13} {v:9.3f} s" for k, v in rows)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text prompt (at most 1024 tokens are used).")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="First-frame conditioning image.")
@click.option("--image-strength", type=float, default=1.0, show_default=True, help="1 keeps the image; 0 ignores it.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default="distilled",
    show_default=True,
    help="distilled: the official 8 + 3 steps; realtime: 5 + 2 steps.",
)
@click.option("--height", type=int, default=None, help="Output height (default: the engines' profile).")
@click.option("--width", type=int, default=None, help="Output width (default: the engines' profile).")
@click.option("--frames", type=int, default=None, help="Frame count, 8k+1 (default: the engines' profile).")
@click.option("--fps", type=float, default=None, help="Frame rate (default: the engines' profile).")
@click.option("--output", type=click.Path(path_type=Path), default=Path("out.mp4"), show_default=True)
@click.option("--raw", type=click.Path(path_type=Path), default=None, help="Also save frames and audio (.npz).")
@click.option("--timings", type=click.Path(path_type=Path), default=None, help="Save the stage timings (.json).")
@click.option("--device", default=None, help="Device to run on (default: the one the engines were built for).")
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=True,
    show_default=True,
    help="Replay each engine call as a captured CUDA graph (CUDA devices only).",
)
@click.option(
    "--memory",
    type=click.Choice(MEMORY_POLICIES),
    default="phase",
    show_default=True,
    help="phase: load each engine for its phase and release it after (lowest peak memory); keep: keep all loaded; "
    "offload: keep all loaded but park the text encoder in pinned host memory between prompts (warm servers).",
)
def main(
    engine_dir: Path,
    prompt: str,
    image: Path | None,
    image_strength: float,
    seed: int,
    preset: str,
    height: int | None,
    width: int | None,
    frames: int | None,
    fps: float | None,
    output: Path,
    raw: Path | None,
    timings: Path | None,
    device: str | None,
    cuda_graphs: bool,
    memory: str,
) -> None:
    """Generate a video with audio from ENGINE_DIR (built by `fvrt-build` / `make engines`)."""
    start = time.perf_counter()
    try:
        manifest = read_manifest(engine_dir)
        h, w, f, r = resolve_shape(manifest.profiles, height, width, frames, fps)
        req = Request(prompt, h, w, f, r, seed=seed, preset=preset, image=image, image_strength=image_strength)
        validate_request(req, manifest.profiles)
        outputs = [(flag, p) for flag, p in (("--output", output), ("--raw", raw), ("--timings", timings)) if p]
        for flag, path in outputs:
            check_writable(path, flag)
        if len({p.resolve() for _, p in outputs}) != len(outputs):
            raise ValueError("--output/--raw/--timings: each output needs its own path")
        tokenizer = PromptTokenizer(engine_dir / TOKENIZER_DIR)
        t = time.perf_counter()
        engines = open_engines(engine_dir, device)
        load_time = time.perf_counter() - t
    except ValueError as e:  # EngineError, ImageError, OutputError, TokenizerError and the request checks
        _fail(str(e))

    pipe = Pipeline(engines, tokenizer, cuda_graphs=cuda_graphs, memory=memory)
    writer: dict[str, Mp4Writer] = {}

    def start_mp4(planes: Any) -> None:  # encode the frames while the audio decodes
        writer["mp4"] = Mp4Writer(output, fps=req.fps, width=req.width, height=req.height, sample_rate=pipe.sample_rate)
        writer["mp4"].start_video(planes)

    progress = _Progress()
    try:
        out: Output = pipe(req, progress=progress, on_video=start_mp4, frames=raw is not None)
        progress.close()
        t = time.perf_counter()
        writer["mp4"].finish(out.audio)
        mux_time = time.perf_counter() - t
    except BaseException:
        progress.close()
        if "mp4" in writer:
            writer["mp4"].abort()
        raise
    if raw is not None:
        save_raw(raw, out.frames, out.audio, sample_rate=out.sample_rate, fps=out.fps)
    times = {"engine_load": load_time, **out.timings, "mux": mux_time, "total": time.perf_counter() - start}
    click.echo(
        f"wrote {output} ({req.width}x{req.height}, {req.frames} frames @ {req.fps:g} fps, "
        f"audio {out.sample_rate} Hz, preset {preset}, seed {seed})"
    )
    click.echo(_report(times))
    if timings is not None:
        record = {
            "timings_s": times,
            "request": {
                "prompt": prompt,
                "height": req.height,
                "width": req.width,
                "frames": req.frames,
                "fps": req.fps,
                "seed": seed,
                "preset": preset,
                "steps": [len(PRESETS[preset].stage_1) - 1, len(PRESETS[preset].stage_2) - 1],
                "image": str(image) if image is not None else None,
            },
            "device": str(engines.device),
            "device_name": torch.cuda.get_device_name(engines.device) if engines.device.type == "cuda" else "cpu",
            "cuda_graphs": pipe.graphs.enabled,
        }
        write_atomic(timings, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
