"""The bench's official side (scripts/official_distilled.py): ltx-core modules built by the official ledger from
in-memory fvrt stages must produce what the official pipeline produces from the files of the same release.

CPU, fp32, a tiny random release: `official_distilled` (tests/official_pipeline.py: official loaders reading the
files, official Gemma loader) against `official_distilled.run` over `MemoryLedger` (the official builders fed by
fvrt's loaded modules, fvrt's Gemma3TextModel inside the official text encoder, the engine directory's tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import oracle
import torch
from official_pipeline import official_distilled, tiny_release

from fvrt.builder.checkpoint import ModelVersion
from fvrt.builder.engines import PRESET_PROFILES
from fvrt.metrics import psnr, snr

TINY = PRESET_PROFILES["tiny"]
PROMPT = "A lighthouse keeper climbs the stairs while a storm rolls in over the sea."


def test_memory_ledger_reproduces_the_official_pipeline_from_files(tmp_path: Path) -> None:
    od = oracle._official_distilled()
    rel = tiny_release(tmp_path, ModelVersion.LTX23)
    ckpt = rel.checkpoint
    shape = dict(prompt=PROMPT, seed=5, height=TINY.height, width=TINY.width, num_frames=TINY.frames,
                 frame_rate=TINY.fps)  # fmt: skip
    ref = official_distilled(rel.main, rel.upsampler, rel.gemma, **shape)
    built: list[str] = []

    def stage(name: str) -> torch.nn.Module:
        built.append(name)
        return getattr(ckpt, name)

    configs = {n: ckpt.upsampler_config if n == "upsampler" else ckpt.config for n in od.BUILDERS.values()}
    ledger = od.MemoryLedger(stage=stage, gemma=lambda: ckpt.text_encoder, configs=configs,
                             tokenizer_dir=rel.tokenizer, dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    with od.official_tiny_gemma():
        frames, audio, rate, timer = od.run(ledger, dtype=torch.float32, device=torch.device("cpu"), tiled_decode=False,
                                            **shape)  # fmt: skip
    assert frames.shape == ref.frames.shape and frames.dtype == torch.uint8 and rate == ref.sample_rate
    assert frames.float().std() > 10, "degenerate output proves nothing"
    p, s = psnr(frames.numpy(), ref.frames.numpy()), snr(audio.numpy(), ref.audio.numpy())
    print(f"memory ledger vs official files: video PSNR {p:.1f} dB, audio SNR {s:.1f} dB")
    assert p >= 70 and s >= 60, (p, s)
    assert set(built) == set(od.BUILDERS.values())  # every model came from the in-memory stages
    assert set(timer.compute) == {*od.STAGES, "end_to_end"} and all(v > 0 for v in timer.compute.values())
    assert np.isclose(timer.compute["end_to_end"], sum(timer.compute[s] for s in od.STAGES))
