"""`make bench`: fvrt engines end to end, bf16 and FP8, presets distilled and realtime, in ONE process.

For each precision: build (or reuse, by build key) the engine directory of the profile with `fvrt-build`'s own
code from the same random weights (same seed), open it with the runtime, and run the pipeline (text encoding,
both stages, upsampling, VAE and audio decoding, MP4 encoding) once as the cold run (engine loading, CUDA-graph
capture) and `--repeats` times warm. Recorded per run: per-stage times, end to end, peak GPU memory. Quality of
FP8 vs bf16 on the same prompt and seed: the DiT velocity cosine at every step of both stages (the bf16 run's
DiT inputs replayed through the FP8 engines) and the decoded-video PSNR / audio SNR.

With `--official` (default on), the official implementation runs in the same process right after the reference
(first) precision, so that a deadline that cuts the later variants short still leaves the same-run ratio:
ltx-pipelines 1.0.0's distilled 8+3 pipeline, stage by stage, over ltx-core modules holding the same random
weights (regenerated from the build's seed; scripts/official_distilled.py), eager, PyTorch SDPA, in the reference
precision's dtype (bf16 for bf16 / fp8 / nvfp4 with any +fa8, +fa8s, +fa4, +sage, +fa3 or +ft8); `--official-runs`
times (default 2), the last one compared (warm, as fvrt's warm runs; every run kept); its per-stage compute times
(model building timed apart), its MP4 encode (ltx-pipelines' own `encode_video`, PyAV), peak memory, and two
same-run ratios per fvrt distilled run: "compute" (both sides without the MP4) and "end to end" (both with it).
No ratio is ever taken against a number from another run. Writes `bench.json` and `bench.md` to --out.

GPU machine (1080p, full-size random weights; engines are rebuilt only when missing or stale):
    FVRT_CXX=g++-12 python3 scripts/bench.py --random full --device cuda --profile 1080p --out $OUT
CPU smoke run (tiny, what `make bench-tiny` does):
    python scripts/bench.py --random tiny --device cpu --profile tiny --out out/bench-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from fvrt.builder.build import PRECISIONS, BuildRequest, build_engines, link_or_copy
from fvrt.builder.engines import PRESET_PROFILES
from fvrt.builder.quant.pipeline_calib import dit_call_kwargs
from fvrt.metrics import psnr, snr
from fvrt.runtime.engine import EngineDir
from fvrt.runtime.media import Mp4Handoff
from fvrt.runtime.pipeline import COLD_TIMINGS, STAGE_TIMINGS, Output, Pipeline, Request
from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer

T0 = time.perf_counter()
PROMPT = "A woman sings on a rooftop at dusk while the city lights come on behind her, a warm breeze in her hair."


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def usage_error(msg: str) -> NoReturn:
    """A mistake in the command line: one line on stderr, exit code 2, before anything is built."""
    print(f"bench.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


class Recorder(Pipeline):
    """Keeps every DiT pass's inputs and outputs (on the CPU) while `record` is a list. The passes are tapped at
    the graph runner (the inputs handed to the ("dit", key) graph, the velocities it returns): a replayed CUDA
    graph never calls the Python `_dit`, and nothing may copy to the host inside a capture."""

    record: list[tuple[str, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] | None = None

    decoder_input: tuple[str, torch.Tensor] | None = None  # the video decoder's (key, latent), for --trace

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graphs = _Tap(self.graphs, self)  # type: ignore[assignment]

    def _run(self, engine: str, key: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.record is not None and engine == "video_decoder":
            self.decoder_input = (key, inputs[0].detach().contiguous().cpu())  # the engine reads contiguous
        return super()._run(engine, key, *inputs)


class _Tap:
    def __init__(self, runner: Any, pipe: Recorder) -> None:
        self.runner, self.pipe = runner, pipe

    def __call__(self, key: Any, fn: Any, *inputs: torch.Tensor) -> Any:
        out = self.runner(key, fn, *inputs)
        if self.pipe.record is not None and key[0] == "dit":
            self.pipe.record.append((key[1], tuple(t.cpu() for t in inputs), tuple(t.float().cpu() for t in out)))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(
    pipe: Pipeline, req: Request, out_mp4: Path, device: torch.device, frames: bool
) -> tuple[Output, dict[str, float], np.ndarray]:
    """One generation including the MP4 (the AAC encoded while the video decodes, as fvrt-run does). frames=False
    is what fvrt-run does without --raw (no RGB host copy). Also returns the yuv420p planes handed to the MP4."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mp4 = Mp4Handoff(out_mp4, fps=req.fps, width=req.width, height=req.height, sample_rate=pipe.sample_rate)
    handed: dict[str, np.ndarray] = {}

    def on_video(planes: np.ndarray) -> None:
        mp4.on_video(planes)
        handed["planes"] = planes

    sync(device)
    t = time.perf_counter()
    with mp4:  # on an error: no partial MP4 left behind
        out = pipe(req, on_audio=mp4.on_audio, on_video=on_video, frames=frames)
        t_mux = time.perf_counter()
        mp4.finish()
    sync(device)
    times = {**out.timings, "mux": time.perf_counter() - t_mux, "end_to_end": time.perf_counter() - t}
    if device.type == "cuda":
        times["peak_gpu_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        # what stays after a prompt: engines, graph pools and outputs (allocated) and the allocator's cache on top
        times["allocated_after_GiB"] = torch.cuda.memory_allocated(device) / 2**30
        times["reserved_after_GiB"] = torch.cuda.memory_reserved(device) / 2**30
    return out, times, handed["planes"]


SUFFIXES = {
    "fa8": "FP8 attention in the DiT (--attention fp8)",
    "fa8s": "smoothed FP8 attention in the DiT (--attention fp8s)",
    "fa4": "FlashAttention-4 in the DiT (--attention fa4)",
    "sage": "SageAttention 2 (INT8 Q K^T, FP8 P V) in the DiT (--attention sage)",
    "fa3": "FlashAttention-3's FP8 kernel in the DiT (--attention fa3fp8)",
    "fa3b": "FlashAttention-3's bf16 kernel in the DiT (--attention fa3, exact)",
    "ft8": "FP8 Gemma decoder layers (--text-precision fp8; fp8 / nvfp4 only)",
}
# suffix -> --attention
ATTENTION_SUFFIXES = {"fa8": "fp8", "fa8s": "fp8s", "fa4": "fa4", "sage": "sage", "fa3": "fa3fp8", "fa3b": "fa3"}


def variant(name: str) -> tuple[str, str | None, str]:
    """ "fp8" -> ("fp8", None, "bf16"); "fp8+fa8+ft8" -> ("fp8", "fp8", "fp8"); "bf16+fa4" -> ("bf16", "fa4",
    "bf16"): the precision, the attention override (ATTENTION_SUFFIXES: at most one, on bf16 / fp8 / nvfp4) and
    the text encoder's precision (FP8 with "+ft8", on fp8 / nvfp4)."""
    precision, *extras = name.split("+")
    attention = [e for e in extras if e in ATTENTION_SUFFIXES]
    bad = [e for e in extras if e not in SUFFIXES] or len(set(extras)) != len(extras) or len(attention) > 1
    bad = bad or (attention and precision not in ("bf16", "fp8", "nvfp4"))
    bad = bad or ("ft8" in extras and precision not in ("fp8", "nvfp4"))
    if precision not in PRECISIONS or bad:
        usage_error(
            f"--precisions: '{name}' is not one of {', '.join(PRECISIONS)} with optional "
            + ", ".join(f"+{k} ({v})" for k, v in SUFFIXES.items())
        )
    attn = ATTENTION_SUFFIXES[attention[0]] if attention else None
    return precision, attn, ("fp8" if "ft8" in extras else "bf16")


def official_dtype(precisions: str) -> torch.dtype:
    """The official side's dtype: that of the reference (first) precision's unquantised tensors, whatever its
    spelling ("fp8+ft8" -> bf16, "fp32" -> fp32), so that its video compares with the reference's."""
    return PRECISIONS[variant(precisions.split(",")[0])[0]]


def speedups(official: dict[str, float], precisions: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Same-run ratios, official seconds over fvrt seconds, for every fvrt distilled 8+3 run (the official
    pipeline's work; realtime 5+2 does less): "compute" leaves the MP4 out on both sides (official: its stages;
    fvrt: end to end minus the MP4 finish), "end_to_end" keeps it (official: stages + `encode_video`; fvrt: end to
    end). `official` is bench.json's official "total_s"; `precisions` its "precisions"."""
    out = {}
    for prec, e in precisions.items():
        runs = (("", e.get("distilled", {}).get("warm_median")), (", text prefetched", e.get("text_prefetched", {})
                .get("distilled")))  # fmt: skip
        for label, t in runs:
            if t is not None:
                compute = t["end_to_end"] - t["mux"]
                out[f"{prec} distilled{label}"] = {
                    "fvrt_compute_s": compute,
                    "fvrt_end_to_end_s": t["end_to_end"],
                    "compute": official["compute"] / compute,
                    "end_to_end": official["end_to_end"] / t["end_to_end"],
                }
    return out


def bench_precision(args: argparse.Namespace, name: str, res: dict[str, Any], ref: dict[str, Any]) -> None:
    dev = torch.device(args.device)
    precision, attention, text_precision = variant(name)
    engine_dir = Path(args.engines) / f"{args.profile}-{name}"
    earlier = [Path(args.engines) / f"{args.profile}-{n}" for n in args.precisions.split(",")]
    earlier = [d for d in earlier[: earlier.index(engine_dir)] if d.is_dir()]
    if not engine_dir.exists() and earlier:
        # the engines outside the DiT are the same: hard links, so another precision costs only its DiT on disk
        shutil.copytree(earlier[-1], engine_dir, copy_function=link_or_copy)
    t = time.perf_counter()
    build = build_engines(
        BuildRequest(
            out_dir=engine_dir,
            random=args.random,
            precision=precision,
            device=args.device,
            profiles=(args.profile,),
            attention=attention or args.attention,
            calib_count=args.calib_count,
            calib_method=args.calib_method,
            text_precision=text_precision,
            calib_inputs=calib_from_record(args, ref) if precision in ("fp8", "nvfp4") and ref else None,
            verify=args.verify,
            seed=args.seed,
            conv_layout=args.conv_layout,
            jobs=args.build_jobs,
        ),
        log=log,
    )
    entry: dict[str, Any] = {
        "engine_dir": str(engine_dir),
        "build_s": round(time.perf_counter() - t, 1),
        "up_to_date": build.up_to_date,
    }
    log(f"{name}: engines ready in {entry['build_s']} s ({'reused' if build.up_to_date else 'built'})")
    for done in earlier if args.drop_reference else ():
        shutil.rmtree(done)  # measured already; /dev/shm holds ~60 GB per full-size directory
        log(f"{done}: removed (--drop-reference)")
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the build's model is gone: give its cached blocks back before the engines load
    entry["engines"] = {
        name: {
            "status": "built" if name in build.built else "reused",
            "precision": e.precision,
            "build_s": e.extra.get("build_seconds"),
            "code_MB": round(e.extra.get("code_bytes", 0) / 1e6, 2),
            "weights_GB": round(e.extra.get("weights_bytes", 0) / 1e9, 3),
            **({"max_rel_err_vs_eager": e.extra["verify"]["max_rel_err"]} if "verify" in e.extra else {}),
        }
        for name, e in build.manifest.stages.items()
    }
    t = time.perf_counter()
    engines = EngineDir.open(engine_dir, device=dev)
    entry["open_s"] = time.perf_counter() - t
    pipe = Recorder(engines, PromptTokenizer(engine_dir / TOKENIZER_DIR), memory=args.memory)
    profile = engines.profiles[args.profile]
    out_dir = Path(args.out)
    res["precisions"][name] = entry
    save(args, res)
    for n, preset in enumerate(args.presets.split(",")):
        if n and time.perf_counter() - T0 > args.deadline_s:  # a built precision always gets its first preset
            log(f"{name} {preset}: skipped (past the {args.deadline_s:.0f} s deadline)")
            res.setdefault("skipped", []).append(f"{name} {preset}")
            continue
        req = Request(PROMPT, profile["height"], profile["width"], profile["frames"], profile["fps"], seed=args.seed,
                      preset=preset)  # fmt: skip
        mp4 = out_dir / f"{name}-{preset}.mp4"
        # the first (cold) run records every DiT pass: the warm runs below are timed without the host copies
        pipe.record = [] if preset == "distilled" else None
        # the first run keeps the RGB frames (quality vs the reference); warm runs time what fvrt-run does
        first_out, first_times, first_planes = run_once(pipe, req, mp4, dev, frames=True)
        if pipe.record is not None:
            record, pipe.record = pipe.record, None
            entry["dit_passes_recorded"] = len(record)
            entry["dit_pass_s"] = dit_pass_times(pipe, record, dev, args.repeats_dit)
            quality(name, first_out, record, res, ref, engines)
            if args.trace:
                try:  # a profiling failure costs the trace, not the precision's timings
                    entry["kernels"] = kernel_profile(pipe, record, dev)
                except Exception as e:
                    log(f"{name}: trace FAILED: {type(e).__name__}: {e}")
                    entry["kernels_error"] = f"{type(e).__name__}: {e}"
                    e.__traceback__ = None
        runs, planes = [], first_planes
        for i in range(args.repeats):
            pipe.prefetch_text = args.prefetch_text and i == args.repeats - 1  # only the last one prefetches
            _, times, planes = run_once(pipe, req, mp4, dev, frames=False)
            runs.append(times)
        if pipe.prefetch_text:  # one more: its text encoder was copied back during the previous run's MP4 finish
            pipe.prefetch_text = False
            _, entry.setdefault("text_prefetched", {})[preset], planes = run_once(pipe, req, mp4, dev, frames=False)
        # replays of the same request must give the same video (graphs, offload / onload, release and reload)
        entry.setdefault("repeat_identical", {})[preset] = bool(np.array_equal(planes, first_planes))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        entry[preset] = {"first_run": first_times, "warm_median": med, "warm_runs": runs, "mp4": str(mp4)}
        entry["graph_capture_failures"] = dict(pipe.graphs.failures)
        if "cold_start_s" not in entry:  # open + what the first run spent beyond a warm one (loading, capture)
            entry["cold_start_s"] = entry["open_s"] + first_times["end_to_end"] - med["end_to_end"]
        log(f"{name} {preset}: warm end to end {med['end_to_end']:.2f} s (first {first_times['end_to_end']:.2f} s)")
        save(args, res)
    del pipe, engines
    gc.collect()  # the recorder and its graph tap reference each other: only the collector frees the engines
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the parked text encoder's host block goes with its arena (runtime/hostmem.py)


def bench_official(args: argparse.Namespace, res: dict[str, Any], ref: dict[str, Any]) -> None:
    """The official distilled pipeline on the weights of the fvrt builds (same seed), same prompt, seed and
    shape; compared with the reference precision's video and audio."""
    import official_distilled as od  # scripts/ (this script's folder) is on sys.path

    from fvrt.builder.checkpoint import ModelVersion
    from fvrt.builder.configs import full_config, tiny_config, upsampler_config
    from fvrt.builder.random_release import full_random_checkpoint, load_tiny_release, write_tiny_release

    dev, version = torch.device(args.device), ModelVersion("2.3")
    dtype = official_dtype(args.precisions)
    tiny = args.random == "tiny"
    cfg = tiny_config(version) if tiny else full_config(version)
    configs = {n: upsampler_config(version, tiny=tiny) if n == "upsampler" else cfg for n in od.BUILDERS.values()}
    if tiny:  # the build's tiny release, written again from the same seed
        folder = Path(args.out) / "official-release"
        write_tiny_release(folder, version, seed=args.seed)
        ckpt = load_tiny_release(folder, dtype, dev)
        stage, gemma = (lambda n: getattr(ckpt, n)), (lambda: ckpt.text_encoder)
    else:  # each stage regenerated on the GPU when the official ledger builds its model (as a load from disk)

        def stage(n: str) -> torch.nn.Module:
            return getattr(full_random_checkpoint(version, dtype=dtype, device=dev, seed=args.seed, materialize={n}), n)

        def gemma() -> torch.nn.Module:
            return full_random_checkpoint(
                version, dtype=dtype, device=dev, seed=args.seed, materialize={"text_encoder"}
            ).text_encoder

    engine_dir = next(Path(e["engine_dir"]) for e in res["precisions"].values() if Path(e["engine_dir"]).is_dir())
    ledger = od.MemoryLedger(stage=stage, gemma=gemma, configs=configs, tokenizer_dir=engine_dir / TOKENIZER_DIR,
                             dtype=dtype, device=dev)  # fmt: skip
    profile = PRESET_PROFILES[args.profile]
    mp4 = Path(args.out) / "official-distilled.mp4"

    def run_once() -> OfficialRun:
        with od.official_tiny_gemma() if tiny else contextlib.nullcontext():
            frames, audio, rate, timer = od.run(
                ledger, prompt=PROMPT, seed=args.seed, height=profile.height, width=profile.width,
                num_frames=profile.frames, frame_rate=profile.fps, dtype=dtype, device=dev,
            )  # fmt: skip
        # the official CLI's last step, on the same frames and audio (the video is decoded before it starts)
        mp4_s = od.encode_mp4(frames, audio, rate, profile.fps, mp4)
        return OfficialRun(frames, audio, timer.compute, mp4_s, timer.build, timer.peak_gpu_GiB)

    log(f"official: distilled 8+3 (ltx-pipelines 1.0.0 wiring, ltx-core 1.0.0 modules, eager), {args.official_runs} "
        "run(s), the last one timed")  # fmt: skip
    out, (frames, audio) = official_runs(run_once, args.official_runs, log)
    if dev.type != "cuda":
        out.pop("peak_gpu_GiB")
    total = out["total_s"]
    if ref:
        out[f"video_psnr_db_vs_{ref['precision']}"] = psnr(frames.numpy(), ref["frames"])
        out[f"audio_snr_db_vs_{ref['precision']}"] = snr(audio.numpy(), ref["audio"])
        ref["official"] = (frames.numpy(), audio.numpy())  # the later precisions' outputs are compared with it too
    res["official"] = out  # its same-run ratios are derived in save()
    log(f"official: compute {total['compute']:.2f} s, MP4 {total['mp4']:.2f} s (models built in "
        f"{sum(out['model_build_s'].values()):.1f} s)")  # fmt: skip


@dataclass
class OfficialRun:
    """One run of the official pipeline: its decoded frames and audio, per-stage compute seconds (with
    "end_to_end"), its MP4 encode, the seconds spent building its models, its peak GPU memory."""

    frames: torch.Tensor
    audio: torch.Tensor
    compute_s: dict[str, float]
    mp4_s: float
    model_build_s: dict[str, float]
    peak_gpu_GiB: float


def official_runs(
    run_once: Callable[[], OfficialRun], runs: int, log: Callable[[str], None]
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Run the official pipeline `runs` times back to back and report the last run, warm as fvrt's warm runs are:
    the first call of a process pays for cuDNN's and cuBLAS's heuristics, kernel loading and the allocator's
    growth, which fvrt's figures leave out too (its first run is reported apart). Every run's compute and end to
    end are kept in "runs"; "identical" says whether every run decoded the same frames and audio (same seed: it
    must). Returns bench.json's official entry (without ratios) and the last run's frames and audio."""
    last: OfficialRun | None = None
    each: list[dict[str, float]] = []
    identical, peak = True, 0.0
    for i in range(runs):
        r = run_once()  # only the previous run's output is kept (1080p frames: 0.76 GB a run)
        if last is not None:
            identical &= torch.equal(r.frames, last.frames) and torch.equal(r.audio, last.audio)
        last, peak = r, max(peak, r.peak_gpu_GiB)
        each.append({"compute": r.compute_s["end_to_end"], "mp4": r.mp4_s})
        log(f"official: run {i + 1}/{runs}: compute {r.compute_s['end_to_end']:.2f} s, MP4 {r.mp4_s:.2f} s")
    assert last is not None  # runs >= 1 (main refuses less)
    total = {"compute": last.compute_s["end_to_end"], "mp4": last.mp4_s}
    total["end_to_end"] = total["compute"] + total["mp4"]
    out: dict[str, Any] = {
        "compute_s": last.compute_s,
        "mp4_s": last.mp4_s,
        "total_s": total,
        "model_build_s": last.model_build_s,
        "peak_gpu_GiB": peak,
        "runs": each,
        "timed_run": f"{runs} of {runs}" + (" (warm)" if runs > 1 else " (cold: the process's first)"),
        "identical": identical,
    }
    return out, (last.frames, last.audio)


def step(args: argparse.Namespace, res: dict[str, Any], name: str, run: Callable[[], None]) -> None:
    """One step of the bench (a precision, the official side): skipped past the deadline; a failure is recorded,
    not raised, so the steps after it and what the earlier ones measured are kept."""
    if time.perf_counter() - T0 > args.deadline_s:
        log(f"{name}: skipped (past the {args.deadline_s:.0f} s deadline)")
        res.setdefault("skipped", []).append(name)
    else:
        try:
            run()
        except Exception as e:
            log(f"{name}: FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            e.__traceback__ = None  # its frames hold the pipeline, its graphs and engines
        gc.collect()  # after a failure too (H100: a failed bf16 left 30 GB of graph pools and fp8 ran out of memory)
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    save(args, res)


def save(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """bench.json after every step: a run cut short still leaves what it measured. The same-run ratios are derived
    here, so they cover every precision measured so far, also those after the official side."""
    if "official" in res:
        res["official"]["speedup"] = speedups(res["official"]["total_s"], res["precisions"])
    (Path(args.out) / "bench.json").write_text(json.dumps(res, indent=1, default=float))


def calib_from_record(args: argparse.Namespace, ref: dict[str, Any]) -> tuple[dict[str, torch.Tensor], ...]:
    """The reference (bf16) run's recorded DiT passes as `LTXDiT.forward` inputs: FP8 calibration on the real
    pipeline trajectory of the benchmark prompt, without an eager pipeline run (which would need the 12B text
    encoder, the DiT and the 1080p decode in memory at once)."""
    profile = PRESET_PROFILES[args.profile]
    out = []
    for key, inputs, _ in ref["record"]:
        out.append(dit_call_kwargs(profile, key, *(t.to(args.device) for t in inputs)))
    return tuple(out)


def dit_pass_times(pipe: Pipeline, record: list, device: torch.device, repeats: int) -> dict[str, float]:
    """Median time of one DiT pass (prep + in + N blocks + out, CUDA-graph replay as in the pipeline) per shape
    key, on the recorded inputs of the first pass at that key."""
    from functools import partial

    out = {}
    for key in sorted({k for k, _, _ in record}):
        inputs = next(tuple(t.to(device) for t in i) for k, i, _ in record if k == key)
        fn = partial(pipe._dit, key)
        pipe.graphs(("dit", key), fn, *inputs)  # captured already by the run; replays
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            pipe.graphs(("dit", key), fn, *inputs)
            sync(device)
            times.append(time.perf_counter() - t)
        out[key] = statistics.median(times)
    return out


KERNEL_KINDS = (  # kernel name substrings -> what the kernel does (first match wins), for --trace's summary
    ("layout transpose", ("nchwtonhwc", "nhwctonchw")),  # cuDNN's own NCDHW <-> NDHWC around a conv
    ("attention", ("fmha", "flash", "attn", "sdpa", "fp8_attention", "_fwd")),
    ("conv", ("conv", "implicit", "winograd", "fprop", "dgrad")),
    ("gemm", ("gemm", "xmma", "cutlass", "cublas", "sm90_", "matmul", "scaled_mm")),
    ("fused (Inductor Triton)", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, subs in KERNEL_KINDS if any(s in low for s in subs)), "other")


def kernel_table(prof: Any, top: int = 30) -> dict[str, Any]:
    """A torch.profiler run -> GPU time per kernel kind and the `top` kernels by total GPU time (ms)."""
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None)
        t = getattr(evt, "cuda_time_total", 0) if t is None else t
        if t > 0 and evt.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((t / 1e3, evt.count, evt.key))
    rows.sort(reverse=True)
    kinds: dict[str, float] = {}
    for ms, _, name in rows:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {
        "total_ms": sum(r[0] for r in rows),
        "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [{"ms": round(ms, 3), "calls": n, "kind": kernel_kind(k), "name": k[:160]} for ms, n, k in rows[:top]],
    }


def kernel_profile(pipe: Recorder, record: list, device: torch.device) -> dict[str, Any]:
    """--trace: GPU kernels of one DiT pass per shape key and of the video decode (run outside CUDA graphs, so
    every kernel launch is seen; times are GPU busy time per kernel, summed)."""
    from torch.profiler import ProfilerActivity, profile

    calls = {f"dit {k}": (lambda k=k, i=i: pipe._dit(k, *(t.to(device) for t in i))) for k, i, _ in reversed(record)}
    if pipe.decoder_input is not None:
        key, latent = pipe.decoder_input
        calls["video_decoder"] = lambda: pipe.engines.run("video_decoder", key, latent.to(device))
    out = {}
    for name, fn in sorted(calls.items()):
        fn()  # warm
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        out[name] = kernel_table(prof)
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in out[name]["by_kind_ms"].items())
        log(f"trace {name}: {out[name]['total_ms']:.1f} ms GPU ({kinds})")
    return out


def quality(
    precision: str, out: Output, record: list, res: dict[str, Any], ref: dict[str, Any], engines: EngineDir
) -> None:
    """The first precision is the reference: keep its frames, audio and DiT passes; later precisions replay the
    reference DiT inputs through their own engines (velocity cosine per step) and compare outputs with it and,
    when the official pipeline ran after the reference, with the official video and audio too."""
    if not ref:
        ref.update(frames=out.frames, audio=out.audio, record=record, precision=precision)
        return
    pipe = Pipeline(engines, lambda _: None, cuda_graphs=False)  # type: ignore[arg-type]
    cosines = []
    with torch.no_grad():
        for key, inputs, want in ref["record"]:
            got = pipe._dit(key, *(t.to(engines.device) for t in inputs))
            pairs = zip(got, want, strict=True)
            cosines.append([float(F.cosine_similarity(g.float().cpu().flatten(), w.flatten(), 0)) for g, w in pairs])
    # the prompt's contexts (text encoder output) are the first pass's inputs 2 and 3: same prompt, own encoder
    ctx = [(g.float(), w.float()) for g, w in zip(record[0][1][2:4], ref["record"][0][1][2:4], strict=True)]
    res["quality"][f"{precision}_vs_{ref['precision']}"] = {
        "text_context_cosine": [float(F.cosine_similarity(g.flatten(), w.flatten(), 0)) for g, w in ctx],
        "text_context_rel_err": [float((g - w).norm() / w.norm()) for g, w in ctx],
        "velocity_cosine_per_step": cosines,
        "min_video_cosine": min(c[0] for c in cosines),
        "min_audio_cosine": min(c[1] for c in cosines),
        "video_psnr_db": psnr(out.frames, ref["frames"]),
        "audio_snr_db": snr(out.audio, ref["audio"]),
    }
    if "official" in ref:  # the official pipeline ran after the reference: the eager bf16 (or fp32) baseline
        q = res["quality"][f"{precision}_vs_{ref['precision']}"]
        q["video_psnr_db_vs_official"] = psnr(out.frames, ref["official"][0])
        q["audio_snr_db_vs_official"] = snr(out.audio, ref["official"][1])


STAGE_COLUMNS = (*STAGE_TIMINGS, "mux", "end_to_end")


def _row(label: str, times: dict[str, float], first_s: float | None) -> str:
    """One table row: the stage columns of `times`, its peak memory, the first run's end to end."""
    cells = " | ".join(f"{times.get(k, float('nan')):.2f}" for k in STAGE_COLUMNS)
    peak = f"{times['peak_gpu_GiB']:.1f}" if "peak_gpu_GiB" in times else "-"
    return f"| {label} | {cells} | {peak} | {'-' if first_s is None else f'{first_s:.2f}'} |"


def official_rows(official: dict[str, Any]) -> tuple[str, str]:
    """The official pipeline's row of the stage table (its MP4 encode in the mux column, end to end with it), then,
    under the table, the same-run ratios: compute (no MP4 on either side) and end to end (MP4 on both)."""
    o, total, peak = official["compute_s"], official["total_s"], official.get("peak_gpu_GiB")
    head = " | ".join(f"{o[k]:.2f}" for k in ("text_encode", "stage_1", "upsample", "stage_2", "video_decode"))
    rows = [f"| official | distilled | {head} | - | {o['audio_decode']:.2f} | {total['mp4']:.2f} | "
            f"{total['end_to_end']:.2f} | {'-' if peak is None else f'{peak:.1f}'} | - |"]  # fmt: skip
    ratios = ["\n| same run, distilled 8+3 | compute s (no MP4) | end to end s (MP4) | official / fvrt, compute "
              "| official / fvrt, end to end |", "|---|---|---|---|---|",
              f"| official | {total['compute']:.2f} | {total['end_to_end']:.2f} | - | - |"]  # fmt: skip
    ratios += [f"| {k} | {v['fvrt_compute_s']:.2f} | {v['fvrt_end_to_end_s']:.2f} | {v['compute']:.2f}x "
               f"| {v['end_to_end']:.2f}x |" for k, v in official["speedup"].items()]  # fmt: skip
    if "runs" in official:  # bench.json files before --official-runs had one (cold) run and no such entry
        each = ", ".join(f"{r['compute']:.2f} + {r['mp4']:.2f}" for r in official["runs"])
        same = "identical output" if official["identical"] else "OUTPUT DIFFERED between runs"
        ratios.append(f"\nofficial: run {official['timed_run']} timed; every run's compute + MP4 s: {each}; {same}")
    return rows[0], "\n".join(ratios)


def table(res: dict[str, Any]) -> str:
    rows = ["| precision | preset | text | stage 1 | upsample | stage 2 | video dec | frames out | audio dec | mux "
            "| end to end | peak GiB | first run |", "|---" * 13 + "|"]  # fmt: skip
    for prec, e in res["precisions"].items():
        for preset in res["presets"]:
            if preset not in e:
                continue
            rows.append(_row(f"{prec} | {preset}", e[preset]["warm_median"], e[preset]["first_run"]["end_to_end"]))
            if preset in e.get("text_prefetched", {}):
                rows.append(_row(f"{prec} | {preset}, text prefetched", e["text_prefetched"][preset], None))
    for name, q in res["quality"].items():
        cos = f"min velocity cosine video {q['min_video_cosine']:.4f} audio {q['min_audio_cosine']:.4f}"
        dec = f"decoded video PSNR {q['video_psnr_db']:.1f} dB, audio SNR {q['audio_snr_db']:.1f} dB"
        if "video_psnr_db_vs_official" in q:
            dec += (f"; against the official pipeline {q['video_psnr_db_vs_official']:.1f} dB, "
                    f"audio {q['audio_snr_db_vs_official']:.1f} dB")  # fmt: skip
        ctx = ", ".join(f"{c:.4f}" for c in q.get("text_context_cosine", ()))
        rows.append(f"\n{name}: {cos}, {dec}" + (f", text contexts cosine {ctx}" if ctx else ""))
    if "official" in res:
        row, ratios = official_rows(res["official"])
        rows.insert(2, row)
        rows.append(ratios)
    for prec, e in res["precisions"].items():
        passes = ", ".join(f"{k} {v:.3f} s" for k, v in e.get("dit_pass_s", {}).items())
        first = next((e[p]["first_run"] for p in ("distilled", "realtime") if p in e), {})
        inside = ", ".join(f"{k.replace('_', ' ')} {first[k]:.1f} s" for k in COLD_TIMINGS if k in first)
        rows.append(f"\n{prec}: DiT pass {passes}; cold start {e.get('cold_start_s', float('nan')):.1f} s"
                    + (f" (first run: {inside})" if inside else ""))  # fmt: skip
        for call, k in e.get("kernels", {}).items():
            kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in k["by_kind_ms"].items())
            rows.append(f"{prec} kernels, {call}: {k['total_ms']:.1f} ms GPU ({kinds})")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", default="full", choices=["tiny", "full"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", default="1080p")
    ap.add_argument(
        "--precisions",
        default="bf16,fp8",
        help="comma list of bf16, fp8, nvfp4, optionally with one of +fa8 (FP8 attention in the DiT), +fa8s (smoothed "
        "FP8 attention), +fa4 (FlashAttention-4), +sage (SageAttention 2), +fa3 (FlashAttention-3 FP8) and, on fp8 / "
        "nvfp4, +ft8 (FP8 text encoder), e.g. fp8+ft8+fa4; the first is the quality reference",
    )
    ap.add_argument("--presets", default="distilled,realtime")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--repeats-dit", type=int, default=5, help="timed DiT passes per shape key")
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--conv-layout", default="auto", help="fvrt-build --conv-layout of the VAE engines")
    ap.add_argument("--build-jobs", type=int, default=1, help="fvrt-build --jobs: compile processes")
    ap.add_argument("--calib-count", type=int, default=8, help="eager calibration runs (without a reference run)")
    ap.add_argument("--calib-method", default="modelopt", choices=["modelopt", "hooks"])
    ap.add_argument("--memory", default="offload", choices=["keep", "phase", "offload"], help="runtime memory policy")
    ap.add_argument("--verify", action="store_true", help="check every newly built engine against eager")
    ap.add_argument(
        "--drop-reference",
        action="store_true",
        help="delete the earlier precisions' engine directories once the next one is built (RAM-backed /dev/shm)",
    )
    ap.add_argument(
        "--deadline-s", type=float, default=1e9, help="start no new precision, and no second preset, after this"
    )
    ap.add_argument(
        "--official", action=argparse.BooleanOptionalAction, default=True,
        help="run the official implementation after the first precision, same process, same weights "
        "(--no-official: skip it)",
    )  # fmt: skip
    ap.add_argument(
        "--official-runs", type=int, default=2,
        help="official pipeline runs back to back; the last is the one compared (default 2: warm, as fvrt's warm "
        "runs; 1: the cold run alone)",
    )  # fmt: skip
    ap.add_argument(
        "--prefetch-text", action="store_true",
        help="after the warm runs, one more whose text encoder was copied back during the previous run's MP4 "
        "finish (Pipeline prefetch_text; a serving process's back-to-back prompts), reported on its own row",
    )  # fmt: skip
    ap.add_argument(
        "--trace", action="store_true",
        help="profile the GPU kernels of one DiT pass per shape and of the video decode (outside CUDA graphs)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default="engines/bench", help="where the engine directories are built or reused")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.repeats < 1:
        usage_error("--repeats: at least 1 (the warm runs are what the table reports)")
    if args.official_runs < 1:
        usage_error("--official-runs: at least 1")
    if args.trace and dev.type != "cuda":
        usage_error("--trace profiles GPU kernels: it needs --device cuda")
    for name in args.precisions.split(","):
        variant(name)  # a misspelt variant ends the run before anything is built
    if args.official:  # the official side's modules and its MP4 encoder, checked before anything is built
        try:
            import official_distilled as od  # scripts/ (this script's folder) is on sys.path

            od.mp4_encoder()
        except ImportError as e:
            usage_error(f"--official needs ltx-core / ltx-pipelines 1.0.0 and PyAV ({e}); or pass --no-official")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "profile": args.profile,
        "presets": args.presets.split(","),
        "precisions": {},
        "quality": {},
    }
    ref: dict[str, Any] = {}
    for i, precision in enumerate(args.precisions.split(",")):
        step(args, res, precision, functools.partial(bench_precision, args, precision, res, ref))
        if i == 0 and args.official and res["precisions"]:
            # right after the reference precision, whose video it is compared with: a deadline that cuts the later
            # variants short still leaves the same-run ratio
            step(args, res, "official", functools.partial(bench_official, args, res, ref))
    md = f"{res['gpu']}, torch {res['torch']}, {res['date']}, profile {args.profile}\n\n{table(res)}\n"
    (Path(args.out) / "bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
