"""The official distilled pipeline as a test oracle: fp32 on CPU.

`ltx_pipelines.distilled.DistilledPipeline.__call__` hard-codes bf16 and `torch.cuda.synchronize()`, so
`official_distilled` runs the same ltx-core / ltx-pipelines components in the same order with dtype fp32 on CPU:
the wiring is `scripts/official_distilled.run` (line for line `DistilledPipeline.__call__`, shared with the
bench), over the official `ModelLedger` reading the release's files (the official loaders, key ops and
configurators for every model; the Gemma text encoder through the official loader too).

The official Gemma loader needs the tiny-config patch and the transformers-5 buffer population of
`tests/test_text.py` (`official_tiny_gemma`, `official_text_encoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import oracle  # noqa: F401  (installs the torchaudio stub before ltx_core is imported)
import torch
from oracle import _official_distilled, official_tiny_gemma
from test_text import official_text_encoder


class OfficialOutput(NamedTuple):
    frames: torch.Tensor  # [F, H, W, 3] uint8
    audio: torch.Tensor  # [2, S] float32
    sample_rate: int


def official_distilled(
    main: Path,
    upsampler: Path,
    gemma: Path,
    *,
    prompt: str,
    seed: int,
    height: int,
    width: int,
    num_frames: int,
    frame_rate: float,
    image: Path | None = None,
    strength: float = 1.0,
    stage_1_sigmas: Sequence[float] | None = None,
    stage_2_sigmas: Sequence[float] | None = None,
) -> OfficialOutput:
    """`DistilledPipeline(main, gemma, upsampler, loras=[])(prompt, seed, height, width, num_frames, frame_rate,
    images)` in fp32 on CPU (sigmas default to the official constants)."""
    from ltx_pipelines.utils import ModelLedger

    class FileLedger(ModelLedger):
        def text_encoder(self) -> torch.nn.Module:
            return official_text_encoder(gemma)

    device, dtype = torch.device("cpu"), torch.float32
    ledger = FileLedger(
        dtype=dtype, device=device, checkpoint_path=str(main), spatial_upsampler_path=str(upsampler), loras=()
    )
    with official_tiny_gemma():  # Gemma and the embeddings processor are sized by the patch
        frames, audio, rate, _ = _official_distilled().run(
            ledger, prompt=prompt, seed=seed, height=height, width=width, num_frames=num_frames,
            frame_rate=frame_rate, dtype=dtype, device=device, image=image, strength=strength,
            stage_1_sigmas=stage_1_sigmas, stage_2_sigmas=stage_2_sigmas, tiled_decode=False,
        )  # fmt: skip
    return OfficialOutput(frames, audio, rate)


# --------------------------------------------------------------------------------------------------------------
# a tiny random release as both sides see it


class TinyRelease(NamedTuple):
    root: Path
    main: Path  # official-format checkpoint (every stage but the upsampler)
    upsampler: Path
    gemma: Path  # tiny Gemma folder (weights + sentencepiece tokenizer.model)
    tokenizer: Path  # the engine directory's tokenizer/ folder (see `export_tokenizer`)
    image: Path  # a 150x100 PNG: other aspect ratio than the profile, so cover + crop matter
    checkpoint: object  # fvrt LTXCheckpoint loaded from main/upsampler/gemma (fp32)


def export_tokenizer(gemma: Path, out: Path) -> Path:
    """What an engine directory's tokenizer/ holds: the Gemma tokenizer as transformers loads it for the official
    `LTXVGemmaTokenizer`, saved with `save_pretrained` (tokenizer.json + tokenizer_config.json)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gemma), local_files_only=True).save_pretrained(str(out))
    return out


def write_test_image(path: Path, height: int = 100, width: int = 150, seed: int = 0) -> Path:
    """A smooth gradient plus noise (so the H.264 round trip and the resize both change it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def tiny_release(root: Path, version: object) -> TinyRelease:
    from test_engines import tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny_checkpoint(root, version)
    return TinyRelease(
        root,
        root / "main.safetensors",
        root / "up.safetensors",
        root / "gemma",
        export_tokenizer(root / "gemma", root / "tokenizer"),
        write_test_image(root / "image.png"),
        checkpoint,
    )
