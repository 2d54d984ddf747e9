"""`fvrt-run ENGINE_DIR --prompt ...`: generate one MP4 (video + audio) with a built engine directory;
`fvrt-run ENGINE_DIR --batch jobs.jsonl`: one MP4 per line, in one process that loads the engines once.

A thin click wrapper: options -> `Request`s -> checks -> `Pipeline` -> files. Everything that can be checked
before work is checked first (every request against the manifest's profiles, the images, the output paths, the
tokenizer, the engine files); each failure is one line on stderr and exit code 2, with nothing written. Shape
defaults come from the manifest: an option left out takes the value of the first built profile that matches the
options given.

A batch file holds one JSON object per line (blank lines skipped): "prompt" and "output" are required; "raw",
"image", "image_strength", "seed", "preset", "height", "width", "frames", "fps" are optional and default to the
command-line options. Paths are relative to the working directory. Only the first generation pays for loading
the engines and capturing the CUDA graphs; with `--memory offload` (the batch default) the text encoder is copied
back while each MP4 is finished, so the next prompt finds it in place. `--batch -` serves request lines from
standard input as they arrive (engines loaded before the first): one JSON answer per line on standard output,
{"line", "output", "timings_s", "request"}, or {"line", "error"} for a line that fails its checks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import click
import torch

from fvrt.runtime.bundle import engine_source
from fvrt.runtime.manifest import json_object, read_manifest
from fvrt.runtime.media import Mp4Handoff, OutputError, check_writable, save_raw, write_atomic
from fvrt.runtime.pipeline import (
    ALL_ENGINES,
    COLD_TIMINGS,
    DEFAULT_SEED,
    MEMORY_POLICIES,
    STAGE_TIMINGS,
    Output,
    Pipeline,
    Request,
    missing_engines,
    validate_request,
)
from fvrt.runtime.protocol import EngineSet
from fvrt.runtime.sampler import PRESETS
from fvrt.runtime.scratch import interrupt_exit_code, interrupt_name, polite_signals_interrupt
from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer

PROG = "fvrt-run"
EXIT_USAGE = 2  # bad request, engine directory or output path: nothing was run or written
# engine_open: reading the manifest and verifying every file's sha256, before the first generation
TIMING_ORDER = ("engine_open", *STAGE_TIMINGS, "mux", "total")


def open_engines(engine_dir: Path, device: str | None) -> EngineSet:
    """The compiled engine directory (verified: sha256 of every file, torch version, device, GPU)."""
    from fvrt.runtime.engine import open_engine_dir

    return open_engine_dir(engine_dir, device=device)


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"{PROG}: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def check_device(device: str | None) -> None:
    """Refuse, before anything is opened, a --device torch cannot use here: one line naming the choices."""
    if device is None:
        return
    choices = "cpu, cuda, cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device; choose one of {choices}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: fvrt runs on {choices}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"--device {device}: the CPU has no index; use cpu")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is visible on this machine")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")


def check_engines(engine_dir: Path, names: Sequence[str], jobs: Sequence[Job]) -> None:
    """Refuse an engine directory that lacks engines the jobs need (e.g. a `fvrt-build --stages` build)."""
    missing = missing_engines(names, image=any(j.req.image is not None for j in jobs))
    if missing:
        raise ValueError(
            f"{engine_dir}: has no engine {', '.join(missing)}, which the pipeline needs "
            "(a partial build? build them with fvrt-build)"
        )


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


class Job(NamedTuple):
    """One generation of a run: the request and where its files go."""

    req: Request
    output: Path
    raw: Path | None


BATCH_KEYS = ("prompt", "output", "raw", "image", "image_strength", "seed", "preset")
BATCH_KEYS += ("height", "width", "frames", "fps")
_INTEGER_KEYS = ("seed", "height", "width", "frames")
_NUMBER_KEYS = ("image_strength", "fps")
_OPTIONAL_PATHS = ("raw", "image")  # may be null


def parse_line(line: str, where: str) -> dict[str, Any]:
    """One batch line as a JSON object, keys and value types checked; ValueError starting with `where`."""
    obj = json_object(line, where)
    unknown = sorted(set(obj) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}' (keys: {', '.join(BATCH_KEYS)})")
    for key in ("prompt", "output"):
        if key not in obj:
            raise ValueError(f"{where}: '{key}' is required")
    for key, value in obj.items():
        if value is None and key in _OPTIONAL_PATHS:
            continue
        if key in _INTEGER_KEYS:
            ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif key in _NUMBER_KEYS:
            ok, what = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        else:
            ok, what = isinstance(value, str), "a string"
        if not ok:
            raise ValueError(f"{where}: '{key}' must be {what}, got {json.dumps(value)}")
    return obj


def read_batch(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The objects of a JSON Lines batch file as ("--batch FILE line N", object), each `parse_line`-checked;
    ValueError naming the file and line of the first bad one."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--batch {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            where = f"--batch {path} line {n}"
            out.append((where, parse_line(line, where)))
    if not out:
        raise ValueError(f"--batch {path}: no requests in it")
    return out


def line_job(profiles: dict[str, dict[str, Any]], defaults: dict[str, Any], where: str, obj: dict[str, Any]) -> Job:
    """The checked job of a parsed batch line (the command-line options fill the keys it leaves out)."""
    opts = {**defaults, **{k: v for k, v in obj.items() if k not in ("prompt", "output", "raw")}}
    try:
        return _job(profiles, opts, obj["prompt"], obj["output"], obj.get("raw"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_outputs(labelled: Sequence[tuple[str, Job]], timings: Path | None = None) -> None:
    """Every output path writable and none used twice (--output, --raw, --timings); ValueError naming the line."""
    seen: set[Path] = set()
    paths = [(w, flag, p) for w, j in labelled for flag, p in (("--output", j.output), ("--raw", j.raw)) if p]
    for where, flag, path in [*paths, *([("", "--timings", timings)] if timings else [])]:
        prefix = f"{where}: " if where else ""
        try:
            check_writable(path, flag)
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None
        if path.resolve() in seen:
            raise ValueError(f"{prefix}{flag} {path}: each output needs its own path (--output/--raw/--timings)")
        seen.add(path.resolve())


def _job(profiles: dict[str, dict[str, Any]], opts: dict[str, Any], prompt: str, output: Path, raw: Path | None) -> Job:
    """A checked job: shape defaults from the manifest, the request validated, its images read."""
    h, w, f, r = resolve_shape(profiles, opts["height"], opts["width"], opts["frames"], opts["fps"])
    image = Path(opts["image"]) if opts["image"] is not None else None
    req = Request(prompt, h, w, f, r, seed=opts["seed"], preset=opts["preset"], image=image,
                  image_strength=float(opts["image_strength"]))  # fmt: skip
    validate_request(req, profiles)
    return Job(req, Path(output), Path(raw) if raw is not None else None)


def plan_jobs(
    profiles: dict[str, dict[str, Any]],
    batch: Path | None,
    prompt: str | None,
    output: Path | None,
    raw: Path | None,
    timings: Path | None,
    defaults: dict[str, Any],
) -> list[Job]:
    """Every job of the run, checked (requests, images, output paths: writable, none used twice) before any work;
    ValueError with one line otherwise. `--batch -` (requests from standard input, see `serve`): no jobs yet."""
    if batch is not None and str(batch) == "-":
        flags = (("--prompt", prompt), ("--output", output), ("--raw", raw), ("--timings", timings))
        given = [flag for flag, v in flags if v is not None]
        if given:
            raise ValueError(f"--batch -: {given[0]} does not go with requests from standard input")
        return []
    if batch is None:
        if prompt is None:
            raise ValueError("give --prompt (one video) or --batch FILE (one per line)")
        labelled = [("", _job(profiles, defaults, prompt, output or Path("out.mp4"), raw))]
    else:
        given = [flag for flag, v in (("--prompt", prompt), ("--output", output), ("--raw", raw)) if v is not None]
        if given:
            raise ValueError(f"--batch: {given[0]} goes in each line of the batch file, not on the command line")
        labelled = [(where, line_job(profiles, defaults, where, obj)) for where, obj in read_batch(batch)]
    check_outputs(labelled, timings)
    return [j for _, j in labelled]


def serve(
    pipe: Pipeline,
    profiles: dict[str, dict[str, Any]],
    defaults: dict[str, Any],
    lines: Iterable[str],
    answer: Callable[[dict[str, Any]], None],
    *,
    engine_dir: Path = Path("."),
    engine_names: Sequence[str] | None = None,
) -> None:
    """`--batch -`: generate for each request line as it arrives, answering one JSON object per line: {"line",
    "output", "timings_s"} or, for a request that fails its checks or fails while it runs, {"line", "error"} (the
    next line is served all the same). engine_names: the directory's engines (checked per request: an image
    needs the video encoder); default every engine (ALL_ENGINES)."""
    if engine_names is None:
        engine_names = ALL_ENGINES
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"stdin line {n}"
        try:
            job = line_job(profiles, defaults, where, parse_line(line, where))
            check_outputs([(where, job)])
            check_engines(engine_dir, engine_names, [job])
        except ValueError as e:
            answer({"line": n, "error": str(e)})
            continue
        t = time.perf_counter()
        try:
            times = generate(pipe, job)
        except OutputError as e:  # e.g. the disk filled up: this request failed, the server goes on
            answer({"line": n, "error": f"{where}: {e}"})
            continue
        except Exception as e:  # a run-time failure of this request: answered, and the next line is served
            answer({"line": n, "error": f"{where}: generation failed: {type(e).__name__}: {' '.join(str(e).split())}"})
            continue
        times["total"] = time.perf_counter() - t
        answer({"line": n, **_run_record(job, times)})


def _report(timings: dict[str, float]) -> str:
    rows = [f"  {k:<14} {timings[k]:9.3f} s" for k in TIMING_ORDER if k in timings]
    cold = [f"    {k:<12} {timings[k]:9.3f} s" for k in COLD_TIMINGS if timings.get(k, 0.0) > 0]
    return "\n".join(rows + (["  of which, first-use work (a warm run skips it):", *cold] if cold else []))


def _run_record(job: Job, times: dict[str, float]) -> dict[str, Any]:
    """What a run's timings file (and a served answer) says of one video."""
    req = job.req
    request = {
        "prompt": req.prompt,
        "height": req.height,
        "width": req.width,
        "frames": req.frames,
        "fps": req.fps,
        "seed": req.seed,
        "preset": req.preset,
        "steps": [len(PRESETS[req.preset].stage_1) - 1, len(PRESETS[req.preset].stage_2) - 1],
        "image": str(req.image) if req.image is not None else None,
    }
    return {"output": str(job.output), "timings_s": times, "request": request}


def generate(pipe: Pipeline, job: Job) -> dict[str, float]:
    """Run one job: the MP4 (the AAC encoded while the video decodes, the H.264 from the frames' hand-over on,
    written atomically) and the raw .npz when asked. Returns its stage timings with "mux"."""
    req = job.req
    mp4 = Mp4Handoff(job.output, fps=req.fps, width=req.width, height=req.height, sample_rate=pipe.sample_rate)
    progress = _Progress()
    try:
        out: Output = pipe(
            req, progress=progress, on_audio=mp4.on_audio, on_video=mp4.on_video, frames=job.raw is not None
        )
        progress.close()
        t = time.perf_counter()
        mp4.finish()
        mux_time = time.perf_counter() - t
    except BaseException:
        progress.close()
        mp4.abort()
        raise
    if job.raw is not None:
        save_raw(job.raw, out.frames, out.audio, sample_rate=out.sample_rate, fps=out.fps)
    return {**out.timings, "mux": mux_time}


# The batch keys that command-line options give defaults for (a batch line's own key wins)
REQUEST_OPTIONS = tuple(k for k in BATCH_KEYS if k not in ("prompt", "output", "raw"))


@dataclass(frozen=True)
class RunOptions:
    """fvrt-run's command line as click parsed it, one field per parameter of `main` (click passes them by name);
    None: left out."""

    engine_dir: Path
    prompt: str | None
    batch: Path | None
    image: Path | None
    image_strength: float
    seed: int
    preset: str
    height: int | None
    width: int | None
    frames: int | None
    fps: float | None
    output: Path | None
    raw: Path | None
    timings: Path | None
    device: str | None
    cuda_graphs: bool
    memory: str | None

    def request_defaults(self) -> dict[str, Any]:
        """The request options (`REQUEST_OPTIONS`): every job's unless its batch line says otherwise."""
        return {k: getattr(self, k) for k in REQUEST_OPTIONS}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Text prompt (at most 1024 tokens are used). One of --prompt / --batch.")
@click.option(
    "--batch",
    type=click.Path(path_type=Path),
    default=None,
    help='JSON Lines file, one video per line: {"prompt": ..., "output": ...} and any of raw, image, '
    "image_strength, seed, preset, height, width, frames, fps (the options below are their defaults); all in "
    "this process, the engines loaded once. '-': serve request lines from standard input as they arrive, one "
    "JSON answer per line on standard output.",
)
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
@click.option("--output", type=click.Path(path_type=Path), default=None, help="The MP4 (default out.mp4).")
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
    default=None,
    help="phase: load each engine for its phase and release it after (lowest peak memory; the --prompt default); "
    "keep: keep all loaded; offload: keep all loaded but park the text encoder in pinned host memory between "
    "prompts (the --batch default).",
)
def main(**options: Any) -> None:
    """Generate a video with audio from ENGINE_DIR (built by `fvrt-build` / `make engines`, or a bundle file
    written by `fvrt-pack`)."""
    start = time.perf_counter()
    done: list[Path] = []
    try:
        with polite_signals_interrupt():
            _run(RunOptions(**options), start, done)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the output in progress is removed, never half-written
        kept = f"; {len(done)} finished video(s) kept" if done else ""
        _fail(f"interrupted ({interrupt_name(e)}); the video in progress was not written{kept}", interrupt_exit_code(e))


def _run(opts: RunOptions, start: float, done: list[Path]) -> None:
    batch, timings, defaults = opts.batch, opts.timings, opts.request_defaults()
    try:
        if opts.prompt is not None and batch is not None:
            raise ValueError("--prompt and --batch: give one of them")
        check_device(opts.device)
        engine_dir = engine_source(opts.engine_dir)  # a bundle file: unpacked once (fvrt.runtime.bundle)
        manifest = read_manifest(engine_dir)
        stream = batch is not None and str(batch) == "-"
        jobs = plan_jobs(manifest.profiles, batch, opts.prompt, opts.output, opts.raw, timings, defaults)
        check_engines(engine_dir, list(manifest.stages), jobs)
        tokenizer = PromptTokenizer(engine_dir / TOKENIZER_DIR)
        t = time.perf_counter()
        engines = open_engines(engine_dir, opts.device)
        open_time = time.perf_counter() - t
    except ValueError as e:  # EngineError, ImageError, OutputError, TokenizerError and the request checks
        _fail(str(e))

    memory = opts.memory or ("offload" if batch is not None else "phase")
    if stream:  # a server: the engines are loaded now, each request line is answered as it arrives
        pipe = Pipeline(engines, tokenizer, cuda_graphs=opts.cuda_graphs, memory=memory, prefetch_text=True)
        serve(
            pipe,
            manifest.profiles,
            defaults,
            sys.stdin,
            lambda a: click.echo(json.dumps(a)),
            engine_dir=engine_dir,
            engine_names=list(manifest.stages),
        )
        return
    # a serving run copies the parked text encoder back while it finishes each MP4 (see Pipeline)
    pipe = Pipeline(engines, tokenizer, cuda_graphs=opts.cuda_graphs, memory=memory, prefetch_text=len(jobs) > 1)
    records = []
    for i, job in enumerate(jobs):
        t = time.perf_counter()
        try:
            times = {"engine_open": open_time, **generate(pipe, job)} if i == 0 else generate(pipe, job)
        except OutputError as e:  # disk full while writing: the earlier videos of a batch stay
            kept = f" ({len(done)} earlier video(s) written)" if done else ""
            _fail(f"{e}{kept}")
        done.append(job.output)
        times["total"] = time.perf_counter() - (start if i == 0 else t)
        req = job.req
        click.echo(
            f"wrote {job.output} ({req.height}x{req.width}x{req.frames} @ {req.fps:g} fps, "
            f"audio {pipe.sample_rate} Hz, preset {req.preset}, seed {req.seed})"
        )
        click.echo(_report(times))
        records.append(_run_record(job, times))
    if timings is not None:
        env = {
            "device": str(engines.device),
            "device_name": torch.cuda.get_device_name(engines.device) if engines.device.type == "cuda" else "cpu",
            "cuda_graphs": pipe.graphs.enabled,
            "memory": memory,
        }
        record = {**records[0], **env} if batch is None else {"runs": records, **env}
        try:
            write_atomic(timings, json.dumps(record, indent=1) + "\n")
        except OutputError as e:
            _fail(f"--timings {e}")


if __name__ == "__main__":
    main()
