"""Checkpoint loading: strictness, file validation, dtype/device, key maps vs the official key ops.

Precondition / under test / postcondition: each test writes a tiny official-format file, mutates it the way a
user's bad file would be, and checks the one-line error names the culprit.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from oracle import _configurators, _official_sd_ops

from fvrt import load_checkpoint
from fvrt.builder.checkpoint import (
    STAGE_NAMES,
    CheckpointError,
    ModelVersion,
    SafetensorsFile,
    build_random,
    save_checkpoint,
    save_safetensors,
    stage_checkpoint_tensors,
    stage_spec,
)
from fvrt.builder.configs import tiny_config, upsampler_config

MAIN_STAGES = [s for s in STAGE_NAMES if s != "upsampler"]


@pytest.fixture
def tiny_file(tmp_path: Path, version: ModelVersion) -> Path:
    cfg = tiny_config(version)
    modules = {s: build_random(s, cfg, seed=i) for i, s in enumerate(MAIN_STAGES)}
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, modules, cfg, extra_metadata={"model_version": version.value})
    return path


def _rewrite(src: Path, dst: Path, mutate: callable) -> Path:
    f = SafetensorsFile(src)
    tensors = {k: f.tensor(k).clone() for k in f.entries}
    mutate(tensors)
    save_safetensors(dst, tensors, f.metadata)
    return dst


def test_roundtrip_every_stage(tiny_file: Path, version: ModelVersion) -> None:
    ckpt = load_checkpoint(tiny_file, dtype=torch.float32)
    assert ckpt.version is version
    f = SafetensorsFile(tiny_file)
    for stage in MAIN_STAGES:
        module = getattr(ckpt, stage)
        assert module is not None, stage
        for key, value in stage_checkpoint_tensors(stage, module).items():
            assert torch.equal(value, f.tensor(key)), key


def test_missing_tensor_is_named(tiny_file: Path, tmp_path: Path) -> None:
    victim = "model.diffusion_model.transformer_blocks.1.attn2.to_k.weight"
    bad = _rewrite(tiny_file, tmp_path / "bad.safetensors", lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{victim}'"):
        load_checkpoint(bad, dtype=torch.float32)


def test_misshaped_tensor_is_named(tiny_file: Path, tmp_path: Path) -> None:
    victim = "model.diffusion_model.transformer_blocks.0.ff.net.2.weight"

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[victim] = t[victim][:, :-1].contiguous()

    bad = _rewrite(tiny_file, tmp_path / "bad.safetensors", shrink)
    with pytest.raises(CheckpointError, match=rf"tensor '{victim}' has shape"):
        load_checkpoint(bad, dtype=torch.float32)


@pytest.mark.parametrize("victim", ["model.diffusion_model.extra_head.weight", "somewhere_else.weight"])
def test_unexpected_tensor_is_named(tiny_file: Path, tmp_path: Path, victim: str) -> None:
    bad = _rewrite(tiny_file, tmp_path / "bad.safetensors", lambda t: t.__setitem__(victim, torch.ones(3)))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{victim}'"):
        load_checkpoint(bad, dtype=torch.float32)


def test_dtype_and_kept_dtype(tiny_file: Path) -> None:
    ckpt = load_checkpoint(tiny_file, stages=["dit"], dtype=torch.bfloat16)
    assert {p.dtype for p in ckpt.dit.parameters()} == {torch.bfloat16}
    assert ckpt.video_decoder is None
    kept = load_checkpoint(tiny_file, stages=["dit"], dtype=None)
    assert {p.dtype for p in kept.dit.parameters()} == {torch.float32}


def test_pickle_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tiny_file: Path, tmp_path: Path) -> None:
    data = tiny_file.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(bad)


def test_missing_file_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = tmp_path / "noconfig.safetensors"
    save_safetensors(path, {"a": torch.ones(2)}, {})
    with pytest.raises(CheckpointError, match="no 'config'"):
        load_checkpoint(path)


def test_header_is_plain_safetensors(tiny_file: Path) -> None:
    """Files we write are standard safetensors: the reference reader opens them and sees the metadata."""
    from safetensors import safe_open

    with safe_open(str(tiny_file), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["config"])["transformer"]["num_layers"] == 2
        key = next(iter(f.keys()))
        assert torch.equal(f.get_tensor(key), SafetensorsFile(tiny_file).tensor(key))
    (n,) = struct.unpack("<Q", tiny_file.read_bytes()[:8])
    assert n % 8 == 0


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_key_rules_invert_the_official_key_ops(stage: str, version: ModelVersion) -> None:
    """Every key of the official module, written under fvrt's checkpoint key, is mapped back by the official
    loader's SDOps to the same module key: fvrt's declarative rules are the exact inverse, key by key."""
    cfg = upsampler_config(version, tiny=True) if stage == "upsampler" else tiny_config(version)
    with torch.device("meta"):
        official = _configurators()[stage](cfg)
    sd_ops = _official_sd_ops()[stage]
    spec = stage_spec(stage)
    keys = list(official.state_dict())
    assert keys
    for key in keys:
        ckpt_key = spec.checkpoint_key(key)
        assert spec.module_key(ckpt_key) == key
        if sd_ops is not None:
            mapped = sd_ops.apply_to_key(ckpt_key)
            assert mapped is not None, ckpt_key
            results = sd_ops.apply_to_key_value(mapped, torch.empty(0))
            assert [r.new_key for r in results] == [key], ckpt_key


def test_written_files_use_the_release_key_layout(tiny_file: Path) -> None:
    """Keys of a written file sit under the release's prefixes (ltx2-architecture.md §7), e.g. the VAE
    statistics once under `vae.per_channel_statistics.`, not under each VAE half."""
    prefixes = (
        "model.diffusion_model.",
        "text_embedding_projection.",
        "vae.encoder.",
        "vae.decoder.",
        "vae.per_channel_statistics.",
        "audio_vae.decoder.",
        "audio_vae.per_channel_statistics.",
        "vocoder.",
    )
    keys = list(SafetensorsFile(tiny_file).entries)
    assert all(k.startswith(prefixes) for k in keys), [k for k in keys if not k.startswith(prefixes)][:5]
    assert not any(".per_channel_statistics." in k for k in keys if k.startswith(("vae.encoder.", "vae.decoder.")))
    assert "vae.per_channel_statistics.mean-of-means" in keys
    assert "audio_vae.per_channel_statistics.mean-of-means" in keys
