"""GPU: full-size bf16 torch-aot engines from random weights; build time and size per engine; each engine vs eager
bf16 on the same weight tensors; the DiT pass (prep + in + 48 blocks + out) timed against eager at both token
counts of the two-stage pipeline.

Weights are never copied: the engines are bound to the very tensors of the eager model (the runtime's
`AOTIEngine(..., tensors=...)`), and no weights file is written (the full DiT alone is 35 GiB).

Phases keep the GPU under 80 GB: the DiT engines first (DiT 35.4 GiB), then the DiT is dropped and the VAE-side
engines are built (video decoder peak ~28 GiB at 1080p), then the 12B text encoder (22 GiB) if asked for.
Stages that would start after --deadline-s are skipped and reported as such.

On the GPU machine, from the repo root (nothing installable there; fvrt from the copied tree):
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . &&
    PYTHONPATH=/tmp/site python3 lab/gpu_build_engines.py --out $OUT
CPU dry run at tiny size (what CI machines can do):
    python lab/gpu_build_engines.py --random tiny --device cpu --precision fp32 --profile tiny --out /tmp/o
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fvrt.builder.backends.aoti import TorchAOTBackend, weight_file_tensors
from fvrt.builder.checkpoint import ModelVersion
from fvrt.builder.engines import PRESET_PROFILES, EngineSpec, engine_specs
from fvrt.builder.models import dit as D
from fvrt.builder.random_release import full_random_checkpoint, load_tiny_release, write_tiny_release
from fvrt.builder.verify import FP32_REFERENCED, check_against_fp32, check_engine, fp32_maxima, rel_err, worst
from fvrt.plugins import KERNEL_ATTENTION
from fvrt.runtime.backends.aoti import AOTIEngine

DIT = ("dit_prep", "dit_in", "dit_block", "dit_out")
VAE = ("video_encoder", "upsampler", "video_decoder", "audio_decoder")
SMALL_STAGES = ("video_encoder", "video_decoder", "upsampler", "audio_decoder", "vocoder", "text_projection")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, list[float], Any]:
    """Median wall time of `repeats` synchronized calls after one warm-up call."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        self.work = Path(tempfile.mkdtemp(prefix="fvrt-gpu-engines-"))
        self.engines: dict[str, AOTIEngine] = {}
        self.weight_names: dict[str, list[str]] = {}  # per engine: the tensors it reads
        self.results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "engines": {},
            "dit_pass": {},
            "skipped": [],
            "errors": {},
        }

    def out_of_time(self, name: str) -> bool:
        if time.perf_counter() - T0 > self.args.deadline_s:
            self.results["skipped"].append(name)
            log(f"{name}: skipped (past the {self.args.deadline_s:.0f} s deadline)")
            return True
        return False

    def build(self, spec: EngineSpec, attention: str, label: str) -> AOTIEngine:
        backend = TorchAOTBackend(attention=attention)
        sub = self.work / f"{spec.name}-{attention}"
        sub.mkdir(exist_ok=True)
        entry = backend.build(spec, sub, precision=self.args.precision, log=log, write_weights=False)
        eng = AOTIEngine(sub, entry, self.device, tensors=weight_file_tensors(spec, entry.weight_names))
        self.weight_names[spec.name] = entry.weight_names
        self.results["engines"][label] = {
            "attention": entry.extra["attention"],
            "build_s": entry.extra["build_seconds"],
            "export_s": entry.extra["export_seconds"],
            "compile_s": entry.extra["compile_seconds"],
            "code_MB": round(entry.extra["code_bytes"] / 1e6, 2),
            "weights_GB": round(entry.extra["weights_bytes"] / 1e9, 3),
            "weight_tensors": len(entry.weight_names) * max(1, entry.per_layer),
            "shape_keys": list(entry.extra["models"]),
        }
        return eng

    def check(self, spec: EngineSpec, eng: AOTIEngine, label: str) -> None:
        """Engine vs eager on fresh sample inputs, every shape key (per-layer engines: first and last layer)."""
        errs = check_engine(spec, eng)
        worst_err = worst(errs)
        self.results["engines"][label]["max_rel_err"] = worst_err
        self.results["engines"][label]["rel_err"] = errs
        log(f"{label}: max rel err vs eager {worst_err:.2e}")
        if self.dtype != torch.float32 and spec.name in FP32_REFERENCED:
            self.check_fp32(spec, eng)

    def check_fp32(self, spec: EngineSpec, eng: AOTIEngine) -> None:
        # only the tensors the engine reads: text_out's wrapper holds all of Gemma
        row = check_against_fp32(spec, eng, self.weight_names[spec.name])
        self.results["engines"][spec.name]["vs_fp32"] = row
        e_max, b_max = fp32_maxima(row)
        log(f"{spec.name}: vs an fp32 copy: engine {e_max:.2e}, eager bf16 {b_max:.2e}")

    def stage(self, spec: EngineSpec, attention: str = "default", label: str = "") -> AOTIEngine | None:
        """Build and check `spec` with `attention`, kept as `label` (default: the engine's name). A cuDNN engine
        that fails or misses --tol is rebuilt with the default dispatch; a kernel mode (KERNEL_ATTENTION) is
        recorded as it is (it is what is being measured)."""
        label = label or spec.name
        if self.args.engines and spec.name not in self.args.engines.split(","):
            return None
        if self.out_of_time(label):
            return None
        retry = attention == "cudnn"
        try:
            eng = self.build(spec, attention, label)
            self.check(spec, eng, label)
        except Exception as e:  # record, go on with the next engine
            self.results["errors"][f"{label}/{attention}"] = f"{type(e).__name__}: {e}"
            log(f"{label} ({attention}) FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            if retry:
                log(f"{label}: retrying with the default SDPA dispatch")
                return self.stage(spec, "default", label)
            return None
        if retry and self.results["engines"][label]["max_rel_err"] > self.args.tol:
            log(f"{label}: {attention} attention over tolerance, rebuilding with the default dispatch")
            return self.stage(spec, "default", label)
        self.engines[label] = eng
        return eng

    def dit_pass(self, specs: dict[str, EngineSpec], ckpt: Any, profile: Any, blocks: dict[str, str]) -> None:
        """prep + in + N blocks + out through the engines vs `ckpt.dit.forward` eager, both token counts, once per
        block engine in `blocks` (attention -> its label in self.engines), eager timed once."""
        blocks = {a: label for a, label in blocks.items() if label in self.engines}
        if not blocks or not all(n in self.engines for n in DIT if n != "dit_block"):
            return
        e = self.engines
        n_layers = len(specs["dit_block"].per_layer)
        names = specs["dit_block"].input_names[4:]
        for key, stage in ((f"{profile.name}/s1", 1), (f"{profile.name}/s2", 2)):
            prep_in = tuple(t.clone() for t in specs["dit_prep"].sample_inputs(key))
            in_in = tuple(t.clone() for t in specs["dit_in"].sample_inputs(key))

            def engine_pass(prep_in: tuple = prep_in, in_in: tuple = in_in, key: str = key, block: str = "") -> tuple:
                fields = e["dit_prep"].run(key, *prep_in, check=False)
                vx, ax, cv, ca = e["dit_in"].run(key, *in_in, check=False)
                for layer in range(n_layers):
                    vx, ax = e[block].run(key, vx, ax, cv, ca, *fields, layer=layer, check=False)
                got = dict(zip(names, fields, strict=True))
                return e["dit_out"].run(
                    key,
                    vx,
                    ax,
                    got["video_embedded"],
                    got["video_timestep_index"],
                    got["audio_embedded"],
                    got["audio_timestep_index"],
                    check=False,
                )

            f, h, w = profile.latent(stage)
            video_t, index, audio_t, sv, sa = prep_in
            kw = {
                "video_timesteps": video_t.gather(1, index),
                "audio_timesteps": audio_t.expand(1, profile.audio_latents),
                "video_sigma": sv,
                "audio_sigma": sa,
                "video_positions": D.video_positions(f, h, w, profile.fps, device=self.device),
                "audio_positions": D.audio_positions(profile.audio_latents, device=self.device),
                "video_context": in_in[2],
                "audio_context": in_in[3],
            }

            def eager_pass(in_in: tuple = in_in, kw: dict = kw) -> tuple:
                return ckpt.dit(in_in[0], in_in[1], **kw)

            r = self.args.repeats
            with torch.no_grad():
                t_eager, times_eager, (rv, ra) = timed(eager_pass, r, self.device)
                row: dict[str, Any] = {
                    "video_tokens": profile.video_tokens(stage),
                    "audio_tokens": profile.audio_latents,
                    "eager_s": t_eager,
                    "eager_times": times_eager,
                }
                for attention, label in blocks.items():
                    run = functools.partial(engine_pass, block=label)
                    t_eng, times_eng, (v, a) = timed(run, r, self.device)
                    suffix = "" if attention == next(iter(blocks)) else f"@{attention}"
                    row.update(
                        {
                            f"engine_s{suffix}": t_eng,
                            f"engine_times{suffix}": times_eng,
                            f"rel_err_video{suffix}": rel_err(v, rv),
                            f"rel_err_audio{suffix}": rel_err(a, ra),
                        }
                    )
                    log(f"DiT pass {key}: engines ({attention}) {t_eng:.3f} s, rel err {rel_err(v, rv):.2e}")
                if self.device.type == "cuda":
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        try:
                            row["eager_cudnn_s"] = timed(eager_pass, r, self.device)[0]
                        except RuntimeError as err:
                            row["eager_cudnn_s"] = f"failed: {err}"
                    row["peak_GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.results["dit_pass"][key] = row
            log(f"DiT pass {key}: eager {t_eager:.3f} s")

    def save(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / self.args.json_name).write_text(json.dumps(self.results, indent=1, default=str))


def load(run: Run, version: ModelVersion, materialize: set[str]) -> Any:
    a = run.args
    if a.random == "tiny":
        write_tiny_release(run.work / "release", version, seed=a.seed)
        return load_tiny_release(run.work / "release", run.dtype, run.device)
    return full_random_checkpoint(version, dtype=run.dtype, device=run.device, seed=a.seed, materialize=materialize)


def free(run: Run, names: tuple[str, ...]) -> None:
    for n in names:
        run.engines.pop(n, None)
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random", default="full", choices=["tiny", "full"])
    ap.add_argument("--version", default="2.3", choices=["2.0", "2.3"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--profile", default="1080p", help="DiT profile (shape keys <profile>/s1 and /s2)")
    ap.add_argument("--vae-profile", default=None, help="profile of the VAE-side engines (default: --profile)")
    ap.add_argument("--stages", default="dit,vae", help="comma list of: dit, vae, text")
    ap.add_argument(
        "--attention",
        default="cudnn",
        help="comma list of the DiT block engine's attention, each built and timed in the same run: cudnn, default, "
        + ", ".join(KERNEL_ATTENTION)
        + " (the first is the one the other DiT engines and the table's plain columns use)",
    )
    ap.add_argument("--engines", default="", help="comma list: build only these engines of the chosen stages")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip engines that would start after this")
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/gpu_engines")
    ap.add_argument("--json-name", default="gpu_engines.json")
    ap.add_argument("--isolate", action="store_true", help="one process per stage group (a crash loses one group)")
    ap.add_argument("--probe", action="store_true", help="only check which AOTI package flavours load here")
    args = ap.parse_args()
    attentions = args.attention.split(",")
    if bad := [a for a in attentions if a not in ("cudnn", "default", *KERNEL_ATTENTION)]:
        ap.error(f"--attention: unknown {', '.join(bad)}")
    if args.probe:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        probe(Path(args.out))
        return
    if args.isolate:
        isolated(args)
        return
    run = Run(args)
    run.save()
    version = ModelVersion(args.version)
    groups = set(args.stages.split(","))
    dit_profile = PRESET_PROFILES[args.profile]
    vae_profile = PRESET_PROFILES[args.vae_profile or args.profile]
    try:
        if "dit" in groups:
            ckpt = load(run, version, {"dit", *SMALL_STAGES})
            log(f"random {args.random} LTX-{version.value} built on {run.device}")
            specs = {s.name: s for s in engine_specs(ckpt, [dit_profile], device=run.device, seed=args.seed)}
            blocks = {a: "dit_block" if i == 0 else f"dit_block@{a}" for i, a in enumerate(attentions)}
            for name in DIT:
                for attention, label in blocks.items() if name == "dit_block" else [("default", name)]:
                    run.stage(specs[name], attention, label)
                    run.save()
            run.dit_pass(specs, ckpt, dit_profile, blocks)
            run.save()
            free(run, (*DIT, *blocks.values()))
            del specs
            if args.random == "full":  # drop the 35 GiB DiT before the VAE-side and text engines
                ckpt.dit = ckpt.dit.to("meta")
            free(run, ())
        else:
            ckpt = load(run, version, set(SMALL_STAGES))
        if "vae" in groups:
            specs = {s.name: s for s in engine_specs(ckpt, [vae_profile], device=run.device, seed=args.seed)}
            for name in VAE:
                run.stage(specs[name])
                free(run, (name,))
                run.save()
            del specs
        if "text" in groups:
            if args.random == "full":
                from fvrt.builder.random_release import random_gemma_12b

                ckpt.text_encoder = random_gemma_12b(run.dtype, run.device, seed=args.seed)
            specs = {s.name: s for s in engine_specs(ckpt, [vae_profile], device=run.device, seed=args.seed)}
            for name in ("text_in", "text_block", "text_out"):
                run.stage(specs[name])
            run.save()
    finally:
        run.save()
        shutil.rmtree(run.work, ignore_errors=True)
    print_table(run.results)


PROBE = """
import sys, torch
from torch import nn
from fvrt.builder.backends.aoti import WeightsAsInputs, compile_program, export
variant, dev = sys.argv[1], sys.argv[2]
textbook = variant.endswith("@textbook")
variant = variant.removesuffix("@textbook")
m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).to(dev).eval()
x = torch.randn(8, 64, device=dev)
names = [n for n, _ in m.named_parameters()]
w = [p.detach() for p in m.parameters()]
if variant == "constants":  # the textbook AOTI flow: weights baked in
    ep, args = torch.export.export(m, (x,)), (x,)
else:  # fvrt: weights as inputs (no constant at all), optionally one small derived constant
    add = type("AddAnchor", (nn.Module,), {"forward": lambda s, y: y + anchor})
    mod = m if variant == "inputs" else nn.Sequential(m, add())
    anchor = torch.zeros(64, device=dev)
    ep, args = export(mod, names if variant == "inputs" else [f"0.{n}" for n in names], w, (x,)), (*w, x)
path = f"/tmp/probe-{variant}-{dev}.pt2"
if textbook:  # torch's documented one-call flow on the ExportedProgram itself
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
else:
    files = compile_program(ep, args)
    from torch._inductor.package import package_aoti
    package_aoti(path, files)
print("PROBE", variant, dev, "packaged", flush=True)
model = torch._inductor.aoti_load_package(path)
print("PROBE", variant, dev, "loaded", flush=True)
out = model(*args)
out = out[0] if isinstance(out, (tuple, list)) else out
print("PROBE", variant, dev, "ran, max diff", float((out - m(x)).abs().max()), flush=True)
"""


def probe(out: Path, devices: tuple[str, ...] = ("cuda",)) -> dict[str, str]:
    """Which AOTI package flavours load and run here, each in its own process (a segfault loses one row)."""
    rows = {}
    for variant in ("constants@textbook", "inputs@textbook", "constants", "inputs"):
        for dev in devices:
            r = subprocess.run(
                [sys.executable, "-X", "faulthandler", "-c", PROBE, variant, dev],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
            rows[f"{variant}/{dev}"] = f"rc={r.returncode}; " + (lines[-1] if lines else r.stderr[-300:])
            log(f"probe {variant}/{dev}: {rows[f'{variant}/{dev}']}")
    (out / "probe.json").write_text(json.dumps(rows, indent=1))
    return rows


def isolated(args: argparse.Namespace) -> None:
    """Run each stage group in its own process (faulthandler on) and merge their JSON files."""
    merged: dict[str, Any] = {}
    for group in args.stages.split(","):
        left = args.deadline_s - (time.perf_counter() - T0)
        cmd = [sys.executable, "-X", "faulthandler", __file__, "--stages", group, "--json-name", f"{group}.json"]
        for flag in ("random", "version", "device", "precision", "profile", "attention", "repeats", "tol", "seed"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        cmd += ["--out", args.out, "--deadline-s", str(max(left, 0.0))]
        if args.vae_profile:
            cmd += ["--vae-profile", args.vae_profile]
        log(f"group {group}: {' '.join(cmd[3:])}")
        rc = subprocess.run(cmd, check=False).returncode
        path = Path(args.out) / f"{group}.json"
        res = json.loads(path.read_text()) if path.is_file() else {"errors": {}}
        if rc != 0:
            res.setdefault("errors", {})[f"process {group}"] = f"exit code {rc}"
        for k, v in res.items():
            if isinstance(v, dict):
                merged.setdefault(k, {}).update(v)
            elif isinstance(v, list):
                merged.setdefault(k, []).extend(v)
            else:
                merged.setdefault(k, v)
    merged["command"] = " ".join(sys.argv)
    (Path(args.out) / args.json_name).write_text(json.dumps(merged, indent=1, default=str))
    print_table(merged)


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res.get('gpu')}, torch {res.get('torch')}, {res.get('date')}")
    print(f"{'engine':<14} {'attn':<8} {'build s':>8} {'code MB':>8} {'weights GB':>10} {'max rel err':>12}")
    for name, e in res.get("engines", {}).items():
        err = e.get("max_rel_err", float("nan"))
        print(
            f"{name:<14} {e['attention']:<8} {e['build_s']:>8.1f} {e['code_MB']:>8.1f} {e['weights_GB']:>10.3f} "
            f"{err:>12.2e}"
        )
    dit = [e["build_s"] for n, e in res.get("engines", {}).items() if n in DIT]
    if len(dit) == len(DIT):
        code = sum(e["code_MB"] for n, e in res["engines"].items() if n in DIT)
        print(f"DiT engines: build {sum(dit):.1f} s, code {code:.1f} MB")
    for key, r in res.get("dit_pass", {}).items():
        cudnn = r.get("eager_cudnn_s")
        cudnn_s = f", eager+cuDNN {cudnn:.3f} s" if isinstance(cudnn, float) else ""
        print(f"DiT pass {key} ({r['video_tokens']} tokens): eager {r['eager_s']:.3f} s{cudnn_s}")
        for k in (k for k in r if k.startswith("engine_s")):
            sfx = k.removeprefix("engine_s")
            print(
                f"  engines{sfx or ''} {r[k]:.3f} s; rel err video {r['rel_err_video' + sfx]:.2e} "
                f"audio {r['rel_err_audio' + sfx]:.2e}"
            )
    if res.get("skipped"):
        print("skipped:", ", ".join(res["skipped"]))
    for k, v in res.get("errors", {}).items():
        print(f"error {k}: {v[:300]}")


if __name__ == "__main__":
    main()
