"""Stage vocoder: parity with ltx-core's Vocoder / VocoderWithBWE at the tiny config, both versions, fp32 CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

# isort: off
# transformers probes `importlib.util.find_spec("torchaudio")` once at import (lru_cached); after oracle.py has
# installed its torchaudio stub (no __spec__) that probe raises ValueError. Importing transformers first caches
# "not available" (same workaround as test_audio_vae.py).
import transformers  # noqa: F401

# isort: on
from helpers import assert_rel_close
from oracle import official_load, official_random, write_official_checkpoint

from fvrt.builder.checkpoint import (
    CheckpointError,
    ModelVersion,
    build_random,
    load_checkpoint,
    stage_checkpoint_tensors,
)
from fvrt.builder.configs import full_config, tiny_config
from fvrt.builder.models.vocoder import (
    AA_CUTOFF,
    AA_HALF_WIDTH,
    AA_KERNEL,
    build_vocoder,
    hann_sinc_filter,
    kaiser_sinc_filter,
)

T_MEL = 21  # = 4 * 6 - 3: the audio decoder's mel length for 6 latent frames
SAMPLES_PER_FRAME = {ModelVersion.LTX2: 240, ModelVersion.LTX23: 160 * 3}  # 24 kHz; 16 kHz then BWE x3


@pytest.fixture
def written(tmp_path: Path, version: ModelVersion) -> tuple[torch.nn.Module, Path]:
    cfg = tiny_config(version)
    official = official_random("vocoder", cfg, seed=5)
    path = write_official_checkpoint(tmp_path / "vocoder.safetensors", cfg, {"vocoder": official})
    return official, path


def _mel(batch: int = 2) -> torch.Tensor:
    """A log-mel-like input [B, 2, T, 64] (the audio decoder's layout)."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(batch, 2, T_MEL, 64, generator=g) - 1.0


def _official_module(config: dict) -> torch.nn.Module:
    """ltx-core's vocoder built from `config` by its own configurator (imported after oracle's torchaudio stub)."""
    from ltx_core.model.audio_vae import VocoderConfigurator

    return VocoderConfigurator.from_config(copy.deepcopy(config))


def test_vocoder_matches_official(written: tuple[torch.nn.Module, Path], version: ModelVersion) -> None:
    official, path = written
    ours = load_checkpoint(path, stages=["vocoder"], dtype=torch.float32).vocoder
    mel = _mel()
    with torch.no_grad():
        expected = official(mel)
        actual = ours(mel)
    assert actual.shape == (2, 2, T_MEL * SAMPLES_PER_FRAME[version])
    assert ours.output_sampling_rate == official.output_sampling_rate
    assert ours.output_sampling_rate == (24000 if version == ModelVersion.LTX2 else 48000)
    # random weights must give a real waveform, not one pinned at the final tanh / clamp
    assert expected.std() > 0.03 and (expected.abs() > 0.999).float().mean() < 0.2
    assert_rel_close(actual, expected, 1e-5, "waveform")
    if version == ModelVersion.LTX23:  # the 16 kHz BigVGAN stage on its own
        with torch.no_grad():
            low_expected, low_actual = official.vocoder(mel), ours.vocoder(mel)
        assert low_actual.shape == (2, 2, T_MEL * 160)
        assert_rel_close(low_actual, low_expected, 1e-5, "16 kHz stage")


def test_official_loader_accepts_file(written: tuple[torch.nn.Module, Path]) -> None:
    official, path = written
    loaded = official_load("vocoder", path)
    want, got = official.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    mel = _mel(1)
    with torch.no_grad():
        assert torch.equal(loaded(mel), official(mel))


def test_keys_and_shapes_match_official_at_full_size(version: ModelVersion) -> None:
    """The released configs build the official state_dict layout (on meta: no memory, no time)."""
    cfg = full_config(version)
    with torch.device("meta"):
        ours = build_vocoder(cfg)
        official = _official_module(cfg)
    want = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    keys = set(stage_checkpoint_tensors("vocoder", ours))
    assert all(k.startswith("vocoder.") for k in keys)
    if version == ModelVersion.LTX23:
        assert "vocoder.vocoder.conv_pre.weight" in keys and "vocoder.mel_stft.mel_basis" in keys
        assert want["bwe_generator.conv_pre.weight"] == (512, 128, 7)
    else:
        assert "vocoder.conv_pre.weight" in keys
        assert want["conv_pre.weight"] == (1024, 128, 7) and want["ups.0.weight"] == (1024, 512, 16)


def test_constants_equal_official_constructor() -> None:
    """Our kaiser-sinc filters (random init) and the non-persistent Hann-sinc resampler (init_constants) equal the
    official constructor's values."""
    cfg = tiny_config(ModelVersion.LTX23)
    official = _official_module(cfg)
    filt = kaiser_sinc_filter(AA_CUTOFF, AA_HALF_WIDTH, AA_KERNEL)
    for name, b in official.state_dict().items():
        if name.endswith(".filter"):
            assert_rel_close(filt, b, 1e-6, name)
    assert_rel_close(hann_sinc_filter(3), official.resampler.filter, 1e-6, "resampler.filter")
    ours = build_random("vocoder", cfg, seed=0)
    assert torch.equal(ours.resampler.filter, hann_sinc_filter(3))
    assert "resampler.filter" not in ours.state_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(resblock="2"), "resblock"),
        (lambda c: c.update(stereo=False), "stereo"),
        (lambda c: c.pop("upsample_rates"), "upsample_rates"),
        (lambda c: c.update(resblock_kernel_sizes=[3, 8, 11]), "even kernels"),
    ],
)
def test_refuses_unsupported_ltx2_configs(edit, message: str) -> None:
    cfg = tiny_config(ModelVersion.LTX2)
    edit(cfg["vocoder"])
    with torch.device("meta"), pytest.raises(CheckpointError, match=message):
        build_vocoder(cfg)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("vocoder", "activation", "snake", "activation"),
        ("bwe", "resblock", "1", "resblock"),
        ("bwe", "win_size", 1024, "win_size"),
        ("bwe", "num_mels", 80, "num_mels"),
        ("bwe", "hop_length", 160, "generator hop"),
        ("bwe", "apply_final_activation", True, "apply_final_activation"),
    ],
)
def test_refuses_unsupported_ltx23_configs(section: str, key: str, value: object, message: str) -> None:
    cfg = tiny_config(ModelVersion.LTX23)
    cfg["vocoder"][section][key] = value
    with torch.device("meta"), pytest.raises(CheckpointError, match=message):
        build_vocoder(cfg)


def test_exports(version: ModelVersion) -> None:
    """torch.export traces the forward (static shapes, no data-dependent control flow)."""
    model = build_random("vocoder", tiny_config(version), seed=1)
    mel = _mel(1)
    exported = torch.export.export(model, (mel,), strict=False)
    if version == ModelVersion.LTX2:  # running the 2.3 graph module (6k nodes) unrolled costs ~10 s on 2 cores
        with torch.no_grad():
            assert torch.equal(exported.module()(mel), model(mel))
