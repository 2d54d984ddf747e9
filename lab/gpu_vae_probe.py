"""The 1080p video decode on the GPU (issue 6): where its time goes and what cuDNN's algorithm search and the
channels-last 3-D layout change, for the eager decoder and for the torch-aot engine built by `fvrt-build`.

    FVRT_CXX=g++-12 python3 lab/gpu_vae_probe.py --out /tmp/vae [--engines /dev/shm/vae] [--layouts ncdhw,ndhwc]

Full-size LTX-2.3 video decoder, random weights (seed 0), bf16, latent [1, 128, 16, 34, 60] -> 121 x 1088 x
1920. Variants, each timed (median of --reps after a warm-up) in the same process:
- eager, cuDNN heuristics (torch.backends.cudnn.benchmark = False, PyTorch's default)
- eager, cudnn.benchmark = True (cuDNN times its algorithms per shape on the first call)
- eager, channels_last_3d weights and input, cudnn.benchmark = True
- the torch-aot engine for each `--layouts` entry (`fvrt-build --conv-layout`: NCDHW conv weights, cuDNN then
  transposes every conv's input and output; NDHWC weights, channels-last convolutions), each built into
  <engines>/<layout> unless there already
Prints a table last, writes vae.json with the top kernels of the eager default and of each engine (kernel kind
"layout transpose" = cuDNN's NCDHW <-> NDHWC kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import kernel_table  # scripts/bench.py (scripts/ is not a package)

LATENT = (1, 128, 16, 34, 60)


def timed(fn: Any, reps: int) -> tuple[float, float]:
    """(first call, median of `reps` after it) in seconds, synchronized."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def profiled(fn: Any) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return kernel_table(prof, top=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engines", type=Path, default=Path("/dev/shm/vae"), help="engine directory (built if absent)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--engine-only", action="store_true", help="eager only as the reference (no layout variants)")
    ap.add_argument("--layouts", default="ncdhw,ndhwc", help="engine conv weight layouts to build and time")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from fvrt.builder.checkpoint import ModelVersion
    from fvrt.builder.random_release import full_random_checkpoint

    dev = torch.device("cuda")
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    res["cudnn"] = torch.backends.cudnn.version()

    def save() -> None:
        (args.out / "vae.json").write_text(json.dumps(res, indent=1, default=str))

    def record(name: str, fn: Any, benchmark: bool, profile_it: bool = False) -> Any:
        torch.backends.cudnn.benchmark = benchmark
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                first, med = timed(fn, args.reps)
                out = fn()
                row: dict[str, Any] = {"first_s": first, "median_s": med,
                                       "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
                if profile_it:
                    row["kernels"] = profiled(fn)
        except Exception as e:  # out of memory in a variant: recorded, next variant
            row, out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}, None
        res["runs"][name] = row
        print(name, {k: v for k, v in row.items() if k != "kernels"}, flush=True)
        save()
        torch.cuda.empty_cache()
        return out

    t = time.perf_counter()
    dec = full_random_checkpoint(
        ModelVersion("2.3"), dtype=torch.bfloat16, device=dev, seed=0, materialize={"video_decoder"}
    ).video_decoder.eval()
    res["model_build_s"] = time.perf_counter() - t
    latent = torch.randn(LATENT, device=dev, generator=torch.Generator(dev).manual_seed(1)).to(torch.bfloat16)
    ref = record("eager", lambda: dec(latent), False, profile_it=True)
    if not args.engine_only:
        eager_variants(dec, latent, ref, record, res)
    if not args.skip_engine:
        engine_variants(args, latent, ref, record, res)
    save()
    print("\n| H100 video decode 1080p, bf16 | first call s | median s | peak GiB |")
    print("|---|---|---|---|")
    for name, r in res["runs"].items():
        if "error" in r:
            print(f"| {name} | {r['error'][:90]} | | |")
        else:
            print(f"| {name} | {r['first_s']:.3f} | {r['median_s']:.3f} | {r['peak_GiB']:.1f} |")
    for name, r in res["runs"].items():
        if "kernels" in r:
            kinds = ", ".join(f"{k} {v:.0f}" for k, v in r["kernels"]["by_kind_ms"].items())
            print(f"{name}: {r['kernels']['total_ms']:.0f} ms GPU ({kinds})")
    print({k: v for k, v in res.items() if "rel_err" in k})


def eager_variants(dec: Any, latent: torch.Tensor, ref: Any, record: Any, res: dict[str, Any]) -> None:
    record("eager cudnn.benchmark", lambda: dec(latent), True)
    dec.to(memory_format=torch.channels_last_3d)  # in place
    latent_cl = latent.contiguous(memory_format=torch.channels_last_3d)
    got = record("eager channels_last_3d + benchmark", lambda: dec(latent_cl), True, profile_it=True)
    if ref is not None and got is not None:
        res["channels_last_rel_err"] = float((got.float() - ref.float()).norm() / ref.float().norm())
    dec.to(memory_format=torch.contiguous_format)
    del got
    torch.cuda.empty_cache()


def engine_variants(args: Any, latent: torch.Tensor, ref: Any, record: Any, res: dict[str, Any]) -> None:
    """The torch-aot video decoder per conv weight layout, built into <engines>/<layout> (a no-op when a build is
    there already), timed and profiled with cuDNN's heuristics."""
    from fvrt.builder.build import BuildRequest, build_engines
    from fvrt.runtime.engine import EngineDir

    for layout in [s for s in args.layouts.split(",") if s]:
        out = args.engines / layout
        t = time.perf_counter()
        build_engines(BuildRequest(out_dir=out, random="full", precision="bf16", device="cuda", profiles=("1080p",),
                                   stages=("video_decoder",), attention="cudnn", conv_layout=layout))  # fmt: skip
        res[f"engine_{layout}_build_s"] = time.perf_counter() - t
        torch.cuda.empty_cache()
        engines = EngineDir.open(out, device=latent.device, stages=["video_decoder"])
        key = next(iter(engines.profiles))
        got = record(f"engine {layout}", lambda e=engines, k=key: e.run("video_decoder", k, latent)[0], False, True)
        if ref is not None and got is not None:
            res[f"engine_{layout}_rel_err_vs_eager"] = float((got.float() - ref.float()).norm() / ref.float().norm())
        engines = got = None  # free the engine before the next layout's build
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
