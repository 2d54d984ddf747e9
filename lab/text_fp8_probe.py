"""The FP8 text encoder (issue 5, `--text-precision fp8`): quality and speed against bf16, text engines only.

    FVRT_CXX=g++-12 python3 lab/text_fp8_probe.py --random full --device cuda --out /tmp/text8
    python lab/text_fp8_probe.py --random tiny --device cpu --out /tmp/text8   (CPU smoke run)

Builds the three text engines (text_in, text_block x layers, text_out) in bf16, then the same directory with the
Gemma decoder layers in FP8 (hard-linked copy; only text_block is rebuilt: calibrated on every calibration prompt),
both with `fvrt-build`'s own code and the same random weights. For each of a few prompts: the video and audio
contexts of the FP8 encoder against bf16 (cosine, relative error); the encode time (median, engines resident) and
the time to copy the parked encoder back to the GPU (memory="offload" pays it every prompt). Prints a table last
and writes text8.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fvrt.builder.build import BuildRequest, build_engines, link_or_copy
from fvrt.runtime.engine import EngineDir
from fvrt.runtime.pipeline import run_text_encoder
from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import sync  # scripts/bench.py (scripts/ is not a package)

STAGES = ("text_in", "text_block", "text_out")
PROMPTS = (
    "A woman sings on a rooftop at dusk while the city lights come on behind her, a warm breeze in her hair.",
    "Close-up of an old fisherman mending a net, waves breaking on the rocks behind him, gulls calling.",
    "An animated paper fox runs through a snowy forest at night, the aurora shimmering overhead.",
    "A news anchor reads the headline 'Markets rally' while a ticker scrolls across the bottom of the screen.",
)


def timed(fn: Any, dev: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", default="full", choices=["tiny", "full"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engines", type=Path, default=Path("/dev/shm/text8"))
    ap.add_argument("--calib-method", default="hooks", choices=["modelopt", "hooks"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    precision = "bf16"  # --text-precision fp8 needs a bf16 (or low-bit) build
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "torch": torch.__version__, "builds": {}, "prompts": {}}  # fmt: skip

    def save() -> None:
        (args.out / "text8.json").write_text(json.dumps(res, indent=1, default=float))

    dirs = {"bf16": args.engines / "bf16", "fp8": args.engines / "fp8"}
    for name, text_precision in (("bf16", "bf16"), ("fp8", "fp8")):
        if name == "fp8" and not dirs["fp8"].exists():  # the bf16 text_in / text_out engines are shared
            shutil.copytree(dirs["bf16"], dirs["fp8"], copy_function=link_or_copy)
        t = time.perf_counter()
        build = build_engines(
            BuildRequest(
                out_dir=dirs[name],
                random=args.random,
                precision=precision,
                device=args.device,
                stages=STAGES,
                calib_method=args.calib_method,
                text_precision=text_precision,
            )
        )
        entry = res["builds"][name] = {"build_s": time.perf_counter() - t, "built": list(build.built)}
        entry["weights_GB"] = {n: e.extra.get("weights_bytes", 0) / 1e9 for n, e in build.manifest.stages.items()}
        print(name, entry, flush=True)
        save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    engines = {n: EngineDir.open(d, device=dev) for n, d in dirs.items()}
    tokenizer = PromptTokenizer(dirs["bf16"] / TOKENIZER_DIR)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids, mask = (t.to(dev) for t in tokenizer(prompt))
            ctx = {n: run_text_encoder(e, ids, mask) for n, e in engines.items()}
            row = {}
            for which, (a, b) in zip(("video", "audio"), zip(ctx["fp8"], ctx["bf16"], strict=True), strict=True):
                a, b = a.float().flatten(), b.float().flatten()
                row[f"{which}_cosine"] = float(F.cosine_similarity(a, b, 0))
                row[f"{which}_rel_err"] = float((a - b).norm() / b.norm())
            if i == 0:
                for n, e in engines.items():
                    row[f"encode_s_{n}"] = timed(lambda e=e: run_text_encoder(e, ids, mask), dev, args.reps)
            res["prompts"][prompt[:40]] = row
            print(prompt[:40], row, flush=True)
            save()
        if dev.type == "cuda":  # memory="offload": park, then copy back before the next prompt's encode
            for n, e in engines.items():
                e.offload(["text_encoder"])
                for stage in STAGES:
                    e.engine(stage)  # un-park (asynchronous copies on the stream)
                sync(dev)
                times = []
                for _ in range(3):
                    e.offload(["text_encoder"])
                    sync(dev)
                    t = time.perf_counter()
                    for stage in STAGES:
                        e.engine(stage)
                    sync(dev)
                    times.append(time.perf_counter() - t)
                res.setdefault("unpark_s", {})[n] = statistics.median(times)
            save()
    print(f"\n{res['device']}, torch {res['torch']}")
    print("| prompt | video cosine | video rel err | audio cosine | audio rel err |\n|---|---|---|---|---|")
    for p, r in res["prompts"].items():
        print(f"| {p} | {r['video_cosine']:.5f} | {r['video_rel_err']:.4f} | {r['audio_cosine']:.5f} | "
              f"{r['audio_rel_err']:.4f} |")  # fmt: skip
    first = next(iter(res["prompts"].values()))
    for n in dirs:
        gb = sum(res["builds"][n]["weights_GB"].values())
        unpark = res.get("unpark_s", {}).get(n, float("nan"))
        print(f"{n}: encode {first[f'encode_s_{n}']:.3f} s, weights {gb:.1f} GB, un-park {unpark:.3f} s")


if __name__ == "__main__":
    main()
