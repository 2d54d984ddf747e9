"""Stage audio_decoder: parity with ltx-core's AudioDecoder at the tiny config, both versions, fp32 CPU."""

from __future__ import annotations

import copy
import re
from pathlib import Path

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
from fvrt.builder.checkpoint import CheckpointError, ModelVersion, stage_checkpoint_tensors
from fvrt.builder.configs import full_config, tiny_config
from fvrt.builder.models.audio_vae import build_audio_decoder

T_A = 12  # latent frames -> 4 * 12 - 3 = 45 mel frames


@pytest.fixture
def written(tmp_path: Path, version: ModelVersion) -> tuple[torch.nn.Module, Path]:
    cfg = tiny_config(version)
    official = official_random("audio_decoder", cfg, seed=3)
    path = write_official_checkpoint(tmp_path / "audio.safetensors", cfg, {"audio_decoder": official})
    return official, path


def test_audio_decoder_matches_official(written: tuple[torch.nn.Module, Path]) -> None:
    official, path = written
    ours = load_checkpoint(path, stages=["audio_decoder"], dtype=torch.float32).audio_decoder
    torch.manual_seed(0)
    latent = torch.randn(2, 8, T_A, 16)
    with torch.no_grad():
        got, want = ours(latent), official(latent)
    assert got.shape == (2, 2, 4 * T_A - 3, 64)
    assert_rel_close(got, want, 1e-5, "audio decoder mel")
    # causal in time: the first mel frames do not see later latent frames
    late = latent.clone()
    late[:, :, T_A // 2 :] += torch.randn_like(late[:, :, T_A // 2 :])
    with torch.no_grad():
        got_late = ours(late)
    n_safe = 4 * (T_A // 2 - 1) - 3 + 1  # mel rows that depend only on latent rows < T_A // 2
    assert_rel_close(got_late[:, :, :n_safe], got[:, :, :n_safe], 1e-6, "mel rows before the change")
    assert (got_late[:, :, -1] - got[:, :, -1]).abs().max() > 1e-3


def test_official_loader_reads_the_written_file(written: tuple[torch.nn.Module, Path]) -> None:
    official, path = written
    loaded = official_load("audio_decoder", path)
    want = official.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    ours = load_checkpoint(path, stages=["audio_decoder"], dtype=torch.float32).audio_decoder
    assert (
        stage_checkpoint_tensors("audio_decoder", ours).keys()
        == stage_checkpoint_tensors("audio_decoder", official).keys()
    )


def test_released_config_builds_on_meta(version: ModelVersion) -> None:
    with torch.device("meta"):
        m = build_audio_decoder(full_config(version))
    n = sum(p.numel() for p in m.parameters())
    assert 30e6 < n < 60e6, n  # official decoder at ch 128, ch_mult (1, 2, 4): 31.9 M parameters


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mid_block_add_attention", True, "mid_block_add_attention"),
        ("attn_resolutions", [64], "attention at [64]"),
        ("causality_axis", "width", "causality_axis"),
        ("norm_type", "group", "norm_type"),
        ("ch_mult", [1, 2, 4, 8], "3 levels"),
        ("mel_bins", 80, "statistics"),
    ],
)
def test_unsupported_variants_are_refused(key: str, value: object, message: str) -> None:
    cfg = copy.deepcopy(tiny_config(ModelVersion.LTX23))
    cfg["audio_vae"]["model"]["params"]["ddconfig"][key] = value
    with pytest.raises(CheckpointError, match=re.escape(message)), torch.device("meta"):
        build_audio_decoder(cfg)


def test_missing_attention_knob_is_refused() -> None:
    """ltx-core defaults an absent `attn_resolutions` to {8, 16, 32}; fvrt refuses to guess."""
    cfg = copy.deepcopy(tiny_config(ModelVersion.LTX23))
    del cfg["audio_vae"]["model"]["params"]["ddconfig"]["attn_resolutions"]
    with pytest.raises(CheckpointError, match="attn_resolutions"), torch.device("meta"):
        build_audio_decoder(cfg)
