"""GPU check: full-size random LTX-2.3 DiT built by fvrt directly on the GPU, vs the official ltx-core 1.0.0
LTXModel sharing the very same weight tensors, bf16, at the stage-1 (544x960x121) and stage-2 (1088x1920x121)
token counts. Prints relative error and warm forward times (median of N, CUDA-synchronised wall time).

Run on the GPU machine from the repo root (ltx-core carried as a wheel, see docs/benchmarks.md):
    PYTHONPATH=/tmp/site:. python3 lab/gpu_dit_vs_official.py --version 2.3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types

import torch

if "torchaudio" not in sys.modules:  # ltx-core imports it at module import; only its audio encoder uses it
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")

from fvrt.builder.checkpoint import ModelVersion, build_random
from fvrt.builder.configs import full_config, tiny_config
from fvrt.builder.models import dit as D

SHAPES = {"stage1_544x960x121": (16, 17, 30), "stage2_1088x1920x121": (16, 34, 60)}
AUDIO_TOKENS = 126  # 121 frames at 24 fps -> round(121 / 24 * 25)
TEXT_TOKENS = 1024
FPS = 24.0


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="2.3", choices=["2.0", "2.3"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny config, small shapes: a CPU dry run of this script")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig
    from ltx_core.model.transformer import LTXModelConfigurator, Modality

    version = ModelVersion(args.version)
    cfg = tiny_config(version) if args.tiny else full_config(version)
    shapes = {"tiny_3x2x3": (3, 2, 3)} if args.tiny else SHAPES
    dev, dt = torch.device(args.device), torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    ours = build_random("dit", cfg, dtype=dt, device=dev, seed=0)
    sync()
    build_s = time.perf_counter() - t
    with torch.device("meta"):
        official = LTXModelConfigurator.from_config(cfg)
    official.load_state_dict(ours.state_dict(), strict=True, assign=True)  # shares storage: no second copy
    official.eval()
    tr = cfg["transformer"]
    dv = tr["num_attention_heads"] * tr["attention_head_dim"]
    da = tr["audio_num_attention_heads"] * tr["audio_attention_head_dim"]
    cw_v = tr["caption_channels"] if version is ModelVersion.LTX2 else dv
    cw_a = tr["caption_channels"] if version is ModelVersion.LTX2 else da
    results = {
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "version": args.version,
        "params": sum(p.numel() for p in ours.parameters()),
        "build_s": round(build_s, 2),
    }
    g = torch.Generator(device=dev).manual_seed(1)
    reset = torch.cuda.reset_peak_memory_stats if dev.type == "cuda" else (lambda: None)
    peak = (lambda: torch.cuda.max_memory_allocated() / 2**30) if dev.type == "cuda" else (lambda: 0.0)
    for name, (f, h, w) in shapes.items():
        nv = f * h * w
        n_audio = 12 if args.tiny else AUDIO_TOKENS
        vlat = torch.randn(1, nv, 128, device=dev, generator=g).to(dt)
        alat = torch.randn(1, n_audio, 128, device=dev, generator=g).to(dt)
        vpos = D.video_positions(f, h, w, FPS, device=dev).to(dt)  # the official pipelines cast to the latent dtype
        apos = D.audio_positions(n_audio, device=dev)
        mask = torch.ones(1, nv, device=dev)
        mask[:, : h * w] = 0.0  # image-conditioned first latent frame
        sig = torch.tensor([0.725], device=dev)
        vts, ats = mask * sig, torch.ones(1, n_audio, device=dev) * sig
        cv = torch.randn(1, TEXT_TOKENS, cw_v, device=dev, generator=g).to(dt)
        ca = torch.randn(1, TEXT_TOKENS, cw_a, device=dev, generator=g).to(dt)
        vm = Modality(latent=vlat, sigma=sig, timesteps=vts, positions=vpos, context=cv)
        am = Modality(latent=alat, sigma=sig, timesteps=ats, positions=apos, context=ca)
        with torch.inference_mode():
            reset()
            t_off, (ov, oa) = timed(lambda: official(vm, am, BatchedPerturbationConfig.empty(1)), args.repeats, sync)
            peak_off = peak()
            reset()
            kw = dict(
                video_timesteps=vts,
                audio_timesteps=ats,
                video_sigma=sig,
                audio_sigma=sig,
                video_positions=vpos,
                audio_positions=apos,
                video_context=cv,
                audio_context=ca,
            )
            t_ours, (fv, fa) = timed(lambda: ours(vlat, alat, **kw), args.repeats, sync)
            peak_ours = peak()
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
        results[name] = {
            "video_tokens": nv,
            "official_s": round(t_off, 4),
            "fvrt_eager_s": round(t_ours, 4),
            "rel_err_video": rel(fv, ov),
            "rel_err_audio": rel(fa, oa),
            "peak_gib_official": round(peak_off, 2),
            "peak_gib_fvrt": round(peak_ours, 2),
        }
        del ov, oa, fv, fa
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
