"""Video VAE stages (`video_encoder`, `video_decoder`) against the official ltx-core modules, both versions.

Precondition: the official module at the tiny config, randomised with the stage's `randomize`, written as an
official-format checkpoint. Under test: fvrt's loader and forward. Postcondition: outputs match the official
forward (fp32, rel err <= 1e-5), and ltx-core's own loader reads the same file back to the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_rel_close
from oracle import official_load, official_random, write_official_checkpoint

from fvrt import load_checkpoint
from fvrt.builder.checkpoint import CheckpointError, ModelVersion, SafetensorsFile, save_safetensors, stage_spec
from fvrt.builder.configs import full_config, tiny_config

TOL = 1e-5
LATENT = 128
VIDEO = (9, 64, 96)  # frames, height, width -> latent (2, 2, 3)


@pytest.fixture
def vae_file(tmp_path: Path, version: ModelVersion) -> tuple[Path, dict[str, torch.nn.Module]]:
    cfg = tiny_config(version)
    official = {s: official_random(s, cfg, seed=i + 3) for i, s in enumerate(("video_encoder", "video_decoder"))}
    # both stages read the shared statistics: give the decoder the encoder's (one tensor per key in the file)
    official["video_decoder"].per_channel_statistics.load_state_dict(
        official["video_encoder"].per_channel_statistics.state_dict()
    )
    path = write_official_checkpoint(tmp_path / "vae.safetensors", cfg, official)
    return path, official


def test_encoder_matches_official(vae_file: tuple[Path, dict], version: ModelVersion) -> None:
    path, official = vae_file
    encoder = load_checkpoint(path, stages=["video_encoder"], dtype=torch.float32).video_encoder
    torch.manual_seed(0)
    for frames in (VIDEO[0], 1):  # a clip, and one frame (image conditioning)
        video = torch.rand(1, 3, frames, *VIDEO[1:]) * 2 - 1
        with torch.no_grad():
            expected = official["video_encoder"](video)
            actual = encoder(video)
        assert actual.shape == (1, LATENT, 1 + (frames - 1) // 8, VIDEO[1] // 32, VIDEO[2] // 32)
        assert_rel_close(actual, expected, TOL, f"{version.value} encoder, {frames} frames")


def test_decoder_matches_official(vae_file: tuple[Path, dict], version: ModelVersion) -> None:
    path, official = vae_file
    decoder = load_checkpoint(path, stages=["video_decoder"], dtype=torch.float32).video_decoder
    torch.manual_seed(1)
    for latent_frames in (2, 1):
        latent = torch.randn(1, LATENT, latent_frames, VIDEO[1] // 32, VIDEO[2] // 32)
        with torch.no_grad():
            expected = official["video_decoder"](latent)
            actual = decoder(latent)
        assert actual.shape == (1, 3, 8 * (latent_frames - 1) + 1, *VIDEO[1:])
        assert_rel_close(actual, expected, TOL, f"{version.value} decoder, {latent_frames} latent frames")


def test_official_loader_reads_the_file(vae_file: tuple[Path, dict]) -> None:
    path, official = vae_file
    for stage in ("video_encoder", "video_decoder"):
        loaded = official_load(stage, path).state_dict()
        expected = official[stage].state_dict()
        assert list(loaded) == list(expected), stage
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), f"{stage}: {key}"


def test_unused_statistics_in_the_file_are_skipped(vae_file: tuple[Path, dict], tmp_path: Path) -> None:
    """Released files also store `channel` and `mean-of-stds` statistics that no official module declares."""
    path, _ = vae_file
    f = SafetensorsFile(path)
    tensors = {k: f.tensor(k).clone() for k in f.entries}
    tensors["vae.per_channel_statistics.channel"] = torch.arange(LATENT, dtype=torch.float32)
    tensors["vae.per_channel_statistics.mean-of-stds"] = torch.ones(LATENT)
    extra = tmp_path / "extra.safetensors"
    save_safetensors(extra, tensors, f.metadata)
    ckpt = load_checkpoint(extra, stages=["video_encoder", "video_decoder"], dtype=torch.float32)
    assert ckpt.video_encoder is not None and ckpt.video_decoder is not None


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("timestep_conditioning", True, "timestep_conditioning"),
        ("norm_layer", "group_norm", "norm_layer"),
        ("latent_log_var", "per_channel", "latent_log_var"),
        ("spatial_padding_mode", "circular", "spatial_padding_mode"),
        ("decoder_blocks", [["attn_res_x", {"num_layers": 1, "attention_head_dim": 8}]], "attn_res_x"),
        ("decoder_blocks", [["res_x", {"num_layers": 1, "inject_noise": True}]], "inject_noise"),
        ("encoder_blocks", [["res_x_y", {"multiplier": 2}]], "res_x_y"),
    ],
)
def test_unsupported_variants_are_refused(key: str, value: object, match: str) -> None:
    cfg = tiny_config(ModelVersion.LTX2)
    cfg["vae"][key] = value
    for stage in ("video_encoder", "video_decoder"):
        with pytest.raises(CheckpointError, match=match), torch.device("meta"):
            stage_spec(stage).build(cfg)


def test_timestep_conditioning_must_be_stated() -> None:
    """ltx-core defaults it to true when absent; fvrt does not guess."""
    cfg = tiny_config(ModelVersion.LTX2)
    del cfg["vae"]["timestep_conditioning"]
    with pytest.raises(CheckpointError, match="timestep_conditioning"), torch.device("meta"):
        stage_spec("video_decoder").build(cfg)


@pytest.mark.parametrize("stage", ["video_encoder", "video_decoder"])
def test_full_size_modules_match_official_shapes(stage: str, version: ModelVersion) -> None:
    """The released configs build the same tensors (names and shapes) as ltx-core, and the full-size graph
    gives the documented shapes at 1088x1920x121 (on meta: no memory, no compute)."""
    from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator

    cfg = full_config(version)
    configurator = {"video_encoder": VideoEncoderConfigurator, "video_decoder": VideoDecoderConfigurator}[stage]
    with torch.device("meta"):
        official = configurator.from_config(cfg)
        ours = stage_spec(stage).build(cfg)
    want = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    with torch.device("meta"):
        if stage == "video_encoder":
            out = ours(torch.empty(1, 3, 121, 1088, 1920))
            assert out.shape == (1, LATENT, 16, 34, 60)
        else:
            out = ours(torch.empty(1, LATENT, 16, 34, 60))
            assert out.shape == (1, 3, 121, 1088, 1920)


def test_19b_config_channel_plan() -> None:
    """The reconstructed 19B `vae` section gives the documented widths: encoder 128->256->512->1024->2048,
    decoder 1024 -> 512 -> 256 -> 128, reflect padding in the decoder only (ltx-core's per-stage defaults)."""
    cfg = full_config(ModelVersion.LTX2)
    json.dumps(cfg["vae"])  # plain JSON, as stored in the header
    with torch.device("meta"):
        enc = stage_spec("video_encoder").build(cfg)
        dec = stage_spec("video_decoder").build(cfg)
    assert enc.conv_out.conv.weight.shape[1] == 2048
    assert dec.conv_in.conv.weight.shape[0] == 1024 and dec.conv_out.conv.weight.shape[1] == 128
    assert [len(b.res_blocks) for b in dec.up_blocks if hasattr(b, "res_blocks")] == [5, 5, 5, 5]
    assert enc.conv_in.padding == "zeros" and dec.conv_in.padding == "reflect"


def test_exports_with_static_shapes(vae_file: tuple[Path, dict], version: ModelVersion) -> None:
    """Both stages trace with torch.export (no data-dependent control flow) and the exported graph computes
    the same outputs."""
    path, _ = vae_file
    ckpt = load_checkpoint(path, stages=["video_encoder", "video_decoder"], dtype=torch.float32)
    torch.manual_seed(2)
    inputs = {
        "video_encoder": torch.rand(1, 3, *VIDEO) * 2 - 1,
        "video_decoder": torch.randn(1, LATENT, 2, VIDEO[1] // 32, VIDEO[2] // 32),
    }
    for stage, x in inputs.items():
        module = getattr(ckpt, stage)
        exported = torch.export.export(module, (x,), strict=False)
        with torch.no_grad():
            assert_rel_close(exported.module()(x), module(x), TOL, f"{version.value} exported {stage}")
