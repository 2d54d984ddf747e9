"""Stage upsampler: parity with ltx-core's LatentUpsampler and `upsample_video` at the tiny config, both versions
(LTX-2.3: Conv2d + PixelShuffle; LTX-2: SpatialRationalResampler), fp32 CPU."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch

# isort: off
# transformers probes `importlib.util.find_spec("torchaudio")` once at import (lru_cached); after oracle.py has
# installed its torchaudio stub (no __spec__) that probe raises ValueError. Importing transformers first caches
# "not available". Belongs in oracle.install_torchaudio_stub (see the helper report).
import transformers  # noqa: F401

# isort: on
from helpers import assert_rel_close
from oracle import official_load, official_random, write_official_checkpoint

from fvrt import load_checkpoint
from fvrt.builder.checkpoint import CheckpointError, ModelVersion
from fvrt.builder.configs import tiny_config, upsampler_config
from fvrt.builder.models.upsampler import LatentUpsampler, build_upsampler, upsample_video_latent

LATENT_SHAPE = (1, 128, 3, 4, 6)  # [B, C, F, H, W]


def _write_pair(tmp_path: Path, version: ModelVersion, up_cfg: dict[str, Any]) -> tuple[torch.nn.Module, Path, Path]:
    """Official random upsampler written as its own file, plus the main file `load_checkpoint` needs for its
    version and config (tensor-free: only the upsampler stage is loaded)."""
    official = official_random("upsampler", up_cfg, seed=5)
    up_path = write_official_checkpoint(tmp_path / "upsampler.safetensors", up_cfg, {"upsampler": official})
    cfg = tiny_config(version)
    main = write_official_checkpoint(tmp_path / "main.safetensors", cfg, {})
    return official, main, up_path


def _load_ours(main: Path, up_path: Path) -> LatentUpsampler:
    ckpt = load_checkpoint(main, upsampler=up_path, stages=["upsampler"], dtype=torch.float32)
    assert ckpt.dit is None and ckpt.audio_decoder is None
    return ckpt.upsampler


def test_upsampler_matches_official(tmp_path: Path, version: ModelVersion) -> None:
    up_cfg = upsampler_config(version, tiny=True)
    official, main, up_path = _write_pair(tmp_path, version, up_cfg)
    ours = _load_ours(main, up_path)
    assert isinstance(ours, LatentUpsampler)
    torch.manual_seed(0)
    latent = torch.randn(LATENT_SHAPE)
    with torch.no_grad():
        got, want = ours(latent), official(latent)
    assert got.shape == (1, 128, 3, 8, 12)
    assert_rel_close(got, want, 1e-5, "upsampled latent")

    # the pipelines' wrapper: video-VAE statistics un-normalise -> upsample -> re-normalise
    from ltx_core.model.upsampler import upsample_video
    from ltx_core.model.video_vae.ops import PerChannelStatistics

    stats = PerChannelStatistics(128)
    mean, std = torch.randn(128) * 0.5, torch.exp(torch.randn(128) * 0.3)
    stats.get_buffer("mean-of-means").copy_(mean)
    stats.get_buffer("std-of-means").copy_(std)
    with torch.no_grad():
        got = upsample_video_latent(latent, ours, mean, std)
        want = upsample_video(latent, types.SimpleNamespace(per_channel_statistics=stats), official)
    assert_rel_close(got, want, 1e-5, "upsample_video")


def test_official_loader_reads_the_written_file(tmp_path: Path, version: ModelVersion) -> None:
    official, _, up_path = _write_pair(tmp_path, version, upsampler_config(version, tiny=True))
    loaded = official_load("upsampler", up_path)
    want, got = official.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_rational_x1_5_matches_official(tmp_path: Path) -> None:
    """The rational resampler at a stride-2 blur (LTX-2.3's x1.5 file layout): conv -> PixelShuffle(3) -> blur/2."""
    up_cfg = {**upsampler_config(ModelVersion.LTX2, tiny=True), "spatial_scale": 1.5}
    official, main, up_path = _write_pair(tmp_path, ModelVersion.LTX2, up_cfg)
    ours = _load_ours(main, up_path)
    torch.manual_seed(1)
    latent = torch.randn(LATENT_SHAPE)
    with torch.no_grad():
        got, want = ours(latent), official(latent)
    assert got.shape == (1, 128, 3, 6, 9)
    assert_rel_close(got, want, 1e-5, "x1.5 upsampled latent")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"dims": 2}, "dims"),
        ({"temporal_upsample": True}, "temporal_upsample=True"),
        ({"spatial_scale": 3.0}, "spatial_scale = 3.0"),
        ({"rational_resampler": False, "spatial_scale": 1.5}, "without rational_resampler"),
        ({"_class_name": "TemporalUpsampler"}, "_class_name"),
    ],
)
def test_unsupported_variants_are_refused(patch: dict[str, Any], message: str) -> None:
    cfg = {**upsampler_config(ModelVersion.LTX2, tiny=True), **patch}
    with pytest.raises(CheckpointError, match=re.escape(message)), torch.device("meta"):
        build_upsampler(cfg)


def test_missing_knob_is_refused() -> None:
    cfg = upsampler_config(ModelVersion.LTX23, tiny=True)
    del cfg["rational_resampler"]
    with pytest.raises(CheckpointError, match="rational_resampler"), torch.device("meta"):
        build_upsampler(cfg)


def test_released_config_builds_on_meta(version: ModelVersion) -> None:
    with torch.device("meta"):
        m = build_upsampler(upsampler_config(version))
    n = sum(p.numel() for p in m.parameters())
    assert 480e6 < n < 520e6, n  # ~498 M parameters, 996 MB in bf16
