"""Engine specs: every engine runs on its sample inputs, and the DiT split (prep -> in -> block x N -> out)
reproduces the model's own forward exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_rel_close

from fvrt import load_checkpoint
from fvrt.builder.checkpoint import STAGE_NAMES, LTXCheckpoint, ModelVersion, build_random, save_checkpoint
from fvrt.builder.configs import tiny_config, upsampler_config
from fvrt.builder.engines import PRESET_PROFILES, Profile, dit_reference, engine_specs
from fvrt.builder.tiny_gemma import write_tiny_gemma

TINY = PRESET_PROFILES["tiny"]


def tiny_checkpoint(tmp: Path, version: ModelVersion) -> LTXCheckpoint:
    cfg = tiny_config(version)
    main = {s: build_random(s, cfg, seed=i) for i, s in enumerate(STAGE_NAMES) if s != "upsampler"}
    save_checkpoint(tmp / "main.safetensors", main, cfg)
    save_checkpoint(
        tmp / "up.safetensors",
        {"upsampler": build_random("upsampler", upsampler_config(version, tiny=True))},
        upsampler_config(version, tiny=True),
    )
    write_tiny_gemma(tmp / "gemma")
    return load_checkpoint(
        tmp / "main.safetensors", upsampler=tmp / "up.safetensors", gemma=tmp / "gemma", dtype=torch.float32
    )


def test_profile_validation() -> None:
    with pytest.raises(ValueError, match="multiples of 64"):
        Profile("x", 1080, 1920, 121).validate()
    with pytest.raises(ValueError, match="8k\\+1"):
        Profile("x", 1088, 1920, 120).validate()
    p = PRESET_PROFILES["1080p"]
    assert (p.video_tokens(1), p.video_tokens(2), p.audio_latents) == (8160, 32640, 126)


def test_every_engine_runs_and_dit_split_matches_forward(tmp_path: Path, version: ModelVersion) -> None:
    ckpt = tiny_checkpoint(tmp_path, version)
    specs = {s.name: s for s in engine_specs(ckpt, [TINY])}
    with torch.no_grad():
        for spec in specs.values():
            for key in spec.shape_keys:
                outs = spec.module_for(key)(*spec.sample_inputs(key))
                outs = outs if isinstance(outs, tuple) else (outs,)
                assert len(outs) == len(spec.output_names), spec.name
                assert all(torch.isfinite(o.float()).all() for o in outs), spec.name

        key = "tiny/s1"
        prep_in = specs["dit_prep"].sample_inputs(key)
        in_in = specs["dit_in"].sample_inputs(key)
        fields = specs["dit_prep"].module_for(key)(*prep_in)
        vx, ax, cv, ca = specs["dit_in"].module(*in_in)
        block = specs["dit_block"]
        for layer in block.per_layer:
            vx, ax = torch.func.functional_call(
                block.module.block,
                dict(layer.named_parameters()),
                (vx, ax, cv, ca, *block.module.fields_to_streams(fields)),
            )
        names = block.input_names[4:]
        got = dict(zip(names, fields, strict=True))
        v, a = specs["dit_out"].module(
            vx,
            ax,
            got["video_embedded"],
            got["video_timestep_index"],
            got["audio_embedded"],
            got["audio_timestep_index"],
        )

        ref_v, ref_a = dit_reference(ckpt.dit, TINY, 1, prep_in, in_in)
    assert_rel_close(v, ref_v, 1e-6, "video velocity")
    assert_rel_close(a, ref_a, 1e-6, "audio velocity")
