"""Text side parity: Gemma-3 text encoder (`text_encoder`) and feature extractor + connectors (`text_projection`)
against ltx-core 1.0.0 on CPU in fp32, for LTX-2 (V1 feature extractor) and LTX-2.3 (V2, gated connectors).

The official text-encoder loader builds Gemma from the hard-coded 12B `GEMMA3_CONFIG_FOR_LTX` and its
`GEMMA_MODEL_OPS` (rotary/embed-scale buffers) is written for transformers 4.x (`rotary_emb_local`,
`vision_tower.vision_model`), which transformers 5 no longer has. The oracle therefore patches the config object
with the tiny one and replaces `GEMMA_MODEL_OPS` by `_GEMMA_MODEL_OPS_V5`, which fills the same non-persistent
buffers the transformers-5 way; weights still go through the official `GEMMA_LLM_KEY_OPS`, builder and tokenizer
op, and prompts through the official `GemmaTextEncoder.encode` + `EmbeddingsProcessor.process_hidden_states`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import oracle
import pytest
import torch
from helpers import assert_rel_close
from oracle import official_load, official_random, tiny_gemma_config_data, write_official_checkpoint

from fvrt.builder.checkpoint import (
    CheckpointError,
    ModelVersion,
    SafetensorsFile,
    build_random,
    load_checkpoint,
    save_safetensors,
)
from fvrt.builder.configs import tiny_config
from fvrt.builder.models.gemma import MAX_TOKENS, GemmaTextEncoder, load_gemma
from fvrt.builder.tiny_gemma import LAYOUTS, tiny_gemma_config_dict, write_tiny_gemma

TOL = 1e-5
N_VALID = 37  # valid tokens of the random-input tests, left-padded to MAX_TOKENS
PROMPT = "A cat sits on a red mat while two dogs run along the beach at dawn, dramatic cinematic lighting."


# --------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(name="official_tiny_gemma")
def _official_tiny_gemma() -> Iterator[None]:
    with oracle.official_tiny_gemma():
        yield


@pytest.fixture(scope="module")
def gemma_dir(module_tmp: Callable[[str], Path]) -> Path:
    return write_tiny_gemma(module_tmp("gemma") / "gemma", seed=1)


def _populate_v5(module: torch.nn.Module) -> torch.nn.Module:
    """transformers-5 version of ltx-core's `create_and_populate`: the non-persistent buffers of a meta-built
    `Gemma3ForConditionalGeneration` (rotary inverse frequencies, embedding scale, vision position ids)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    lm = module.model.model.language_model
    lm.rotary_emb = Gemma3RotaryEmbedding(lm.config)
    lm.embed_tokens.register_buffer("embed_scale", torch.tensor(lm.config.hidden_size**0.5), persistent=False)
    emb = module.model.model.vision_tower.embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)
    return module


def official_text_encoder(folder: Path) -> torch.nn.Module:
    """ltx-core's text encoder as `ModelLedger.text_encoder()` builds it, fp32 on CPU (needs the config patch)."""
    from ltx_core.loader.module_ops import ModuleOps
    from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder
    from ltx_core.text_encoders.gemma import (
        GEMMA_LLM_KEY_OPS,
        GEMMA_MODEL_OPS,
        GemmaTextEncoderConfigurator,
        module_ops_from_gemma_root,
    )

    populate = ModuleOps("GemmaModelV5", matcher=GEMMA_MODEL_OPS.matcher, mutator=_populate_v5)
    tokenizer_op = module_ops_from_gemma_root(str(folder))[0]  # [1] is the image processor (needs PIL)
    builder = SingleGPUModelBuilder(
        model_class_configurator=GemmaTextEncoderConfigurator,
        model_path=tuple(str(p) for p in sorted(folder.rglob("*.safetensors"))),
        model_sd_ops=GEMMA_LLM_KEY_OPS,
        module_ops=(populate, tokenizer_op),
    )
    return builder.build(device=torch.device("cpu"), dtype=torch.float32).eval()


def random_hidden_states(seed: int, hidden: int, num_states: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma-like hidden states [1, T, D, L] (per-layer scale and offset, so the per-layer norms matter) and a
    left-padded mask [1, T] with N_VALID real tokens."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(num_states, generator=gen) * 4 + 0.5
    offset = torch.randn(num_states, generator=gen)
    h = torch.randn(1, MAX_TOKENS, hidden, num_states, generator=gen) * scale + offset
    mask = torch.zeros(1, MAX_TOKENS, dtype=torch.int64)
    mask[:, -N_VALID:] = 1
    return h, mask


def _projection_checkpoint(version: ModelVersion, path: Path, seed: int = 0) -> tuple[dict, torch.nn.Module]:
    config = tiny_config(version)
    official = official_random("text_projection", config, seed=seed)
    write_official_checkpoint(path, config, {"text_projection": official})
    return config, official


# --------------------------------------------------------------------------------------------------------------
# text_projection


@pytest.mark.usefixtures("official_tiny_gemma")
def test_text_projection_matches_official(version: ModelVersion, tmp_path: Path) -> None:
    # Precondition: official EmbeddingsProcessor at tiny size, written as an official checkpoint
    config, official = _projection_checkpoint(version, tmp_path / "ltx.safetensors")
    fvrt = load_checkpoint(tmp_path / "ltx.safetensors", stages=["text_projection"], dtype=torch.float32)
    projection = fvrt.text_projection
    hidden, mask = random_hidden_states(seed=3, hidden=32, num_states=config["text_encoder"]["num_hidden_layers"] + 1)

    # Under test
    with torch.no_grad():
        video, audio = projection(hidden, mask)
        ref = official.process_hidden_states(tuple(hidden.unbind(-1)), mask)

    # Postcondition
    assert_rel_close(video, ref.video_encoding, TOL, "video context")
    assert_rel_close(audio, ref.audio_encoding, TOL, "audio context")
    assert bool(ref.attention_mask.all()), "official output mask is all ones after the register replacement"
    # the features themselves (before the connectors) also match
    with torch.no_grad():
        fv, fa = projection.feature_extractor(hidden, mask)
        rv, ra = official.feature_extractor(tuple(hidden.unbind(-1)), mask, "left")
    assert_rel_close(fv, rv, TOL, "video features")
    assert_rel_close(fa, ra, TOL, "audio features")


@pytest.mark.usefixtures("official_tiny_gemma")
def test_text_projection_batch_matches_single(tmp_path: Path) -> None:
    """The official register replacement only works for batch 1; fvrt's gather also handles B > 1."""
    config, _ = _projection_checkpoint(ModelVersion.LTX23, tmp_path / "ltx.safetensors")
    projection = load_checkpoint(tmp_path / "ltx.safetensors", stages=["text_projection"], dtype=torch.float32)
    projection = projection.text_projection
    n = config["text_encoder"]["num_hidden_layers"] + 1
    h1, m1 = random_hidden_states(seed=4, hidden=32, num_states=n)
    h2, m2 = random_hidden_states(seed=5, hidden=32, num_states=n)
    m2[:, -300:] = 1
    with torch.no_grad():
        vb, ab = projection(torch.cat([h1, h2]), torch.cat([m1, m2]))
        for i, (h, m) in enumerate(((h1, m1), (h2, m2))):
            v, a = projection(h, m)
            assert_rel_close(vb[i : i + 1], v, TOL, f"video context, batch item {i}")
            assert_rel_close(ab[i : i + 1], a, TOL, f"audio context, batch item {i}")


@pytest.mark.usefixtures("official_tiny_gemma")
def test_official_loader_reads_written_projection(version: ModelVersion, tmp_path: Path) -> None:
    _, official = _projection_checkpoint(version, tmp_path / "ltx.safetensors")
    loaded = official_load("text_projection", tmp_path / "ltx.safetensors")
    want, got = official.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# --------------------------------------------------------------------------------------------------------------
# text_encoder


@pytest.mark.usefixtures("official_tiny_gemma")
def test_gemma_hidden_states_match_official(gemma_dir: Path) -> None:
    # Precondition
    encoder = load_gemma(gemma_dir, dtype=torch.float32)
    official = official_text_encoder(gemma_dir)
    assert isinstance(encoder, GemmaTextEncoder)
    assert encoder.num_hidden_states == 5 and len(set(encoder.layer_types)) == 2  # sliding and global layers

    # Under test
    with torch.no_grad():
        hidden, mask = encoder.encode_prompt(PROMPT)
        ref_hidden, ref_mask = official.encode(PROMPT)

    # Postcondition: every hidden state at every position, padding rows included
    assert torch.equal(mask, ref_mask)
    n_valid = int(mask.sum())
    assert 10 < n_valid < MAX_TOKENS and bool(mask[0, -n_valid:].all()), "left padding"
    assert hidden.shape == (1, MAX_TOKENS, 32, len(ref_hidden))
    for i, ref in enumerate(ref_hidden):
        assert_rel_close(hidden[..., i], ref, TOL, f"hidden state {i}")
        assert_rel_close(hidden[:, -n_valid:, :, i], ref[:, -n_valid:], TOL, f"hidden state {i}, valid tokens")


@pytest.mark.usefixtures("official_tiny_gemma")
def test_prompt_to_contexts_matches_official(version: ModelVersion, gemma_dir: Path, tmp_path: Path) -> None:
    # Precondition: one LTX checkpoint with the projection, the Gemma folder beside it
    _, official_projection = _projection_checkpoint(version, tmp_path / "ltx.safetensors", seed=7)
    fvrt = load_checkpoint(
        tmp_path / "ltx.safetensors", gemma=gemma_dir, stages=["text_encoder", "text_projection"], dtype=torch.float32
    )
    official_encoder = official_text_encoder(gemma_dir)

    # Under test
    with torch.no_grad():
        hidden, mask = fvrt.text_encoder.encode_prompt(PROMPT)
        video, audio = fvrt.text_projection(hidden, mask)
        ref = official_projection.process_hidden_states(*official_encoder.encode(PROMPT))

    # Postcondition
    assert_rel_close(video, ref.video_encoding, TOL, "video context")
    assert_rel_close(audio, ref.audio_encoding, TOL, "audio context")


def test_gemma_key_layouts_load_identically(tmp_path: Path) -> None:
    """Official (`language_model.model.*`), HF ConditionalGeneration (`model.language_model.*`) and CausalLM
    (`model.*`) files give the same module; vision/projector tensors are ignored."""
    states = {}
    for layout in LAYOUTS:
        folder = write_tiny_gemma(tmp_path / layout, seed=2, layout=layout)
        states[layout] = load_gemma(folder, dtype=torch.float32).state_dict()
    ref = states["official"]
    for layout, state in states.items():
        assert sorted(state) == sorted(ref), layout
        for key, value in ref.items():
            assert torch.equal(state[key], value), f"{layout}: {key}"


def test_gemma_sharded_folder(tmp_path: Path) -> None:
    """A sharded folder (model.safetensors.index.json) loads the same tensors as the single file."""
    folder = write_tiny_gemma(tmp_path / "single", seed=2)
    single = load_gemma(folder, dtype=torch.float32).state_dict()
    f = SafetensorsFile(folder / "model.safetensors")
    keys = sorted(f.entries)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_safetensors(folder / name, {k: f.tensor(k).clone() for k in shard_keys}, {"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    sharded = load_gemma(folder, dtype=torch.float32).state_dict()
    for key, value in single.items():
        assert torch.equal(sharded[key], value), key


def _rewrite_without(folder: Path, drop: str, replace: dict[str, torch.Tensor] | None = None) -> None:
    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {k: f.tensor(k).clone() for k in f.entries if k != drop}
    tensors.update(replace or {})
    del f
    save_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})


def test_missing_gemma_tensor_is_named(tmp_path: Path) -> None:
    folder = write_tiny_gemma(tmp_path / "gemma", seed=2)
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    _rewrite_without(folder, name)
    with pytest.raises(CheckpointError, match=f"missing Gemma tensor '{name}'"):
        load_gemma(folder, dtype=torch.float32)


def test_misshaped_gemma_tensor_is_named(tmp_path: Path) -> None:
    folder = write_tiny_gemma(tmp_path / "gemma", seed=2)
    name = "language_model.model.layers.0.self_attn.k_proj.weight"
    _rewrite_without(folder, name, {name: torch.randn(8, 32)})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[8, 32\]"):
        load_gemma(folder, dtype=torch.float32)


def test_unexpected_gemma_tensor_is_named(tmp_path: Path) -> None:
    folder = write_tiny_gemma(tmp_path / "gemma", seed=2)
    name = "language_model.model.layers.9.mlp.up_proj.weight"
    _rewrite_without(folder, "", {name: torch.randn(64, 32)})
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{name}'"):
        load_gemma(folder, dtype=torch.float32)


def test_long_prompt_is_truncated_with_warning(gemma_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ltx_core.text_encoders.gemma.tokenizer import LTXVGemmaTokenizer

    encoder = load_gemma(gemma_dir, dtype=torch.float32)
    long_prompt = " ".join([PROMPT] * 80)  # far more than 1024 tokens
    with caplog.at_level(logging.WARNING, logger="fvrt.builder.models.gemma"):
        ids, mask = encoder.tokenizer(long_prompt)
    assert any("only the first 1024 are used" in r.getMessage() for r in caplog.records), caplog.text
    assert ids.shape == mask.shape == (1, MAX_TOKENS) and bool(mask.all())
    # same ids as the official tokenizer (which truncates silently)
    pairs = LTXVGemmaTokenizer(str(gemma_dir), MAX_TOKENS).tokenize_with_weights(long_prompt)["gemma"]
    assert ids[0].tolist() == [int(t) for t, _ in pairs]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fvrt.builder.models.gemma"):
        _, mask = encoder.tokenizer(PROMPT)
    assert not caplog.records and 0 < int(mask.sum()) < MAX_TOKENS


def test_stages_export_without_graph_breaks(version: ModelVersion, gemma_dir: Path) -> None:
    """torch.export (strict shapes, no data-dependent control flow) of both stages; the exported programs
    reproduce eager exactly (register gather and masks are static-shape tensor ops)."""
    projection = build_random("text_projection", tiny_config(version), seed=1)
    hidden, mask = random_hidden_states(seed=6, hidden=32, num_states=5)
    exported = torch.export.export(projection, (hidden, mask)).module()
    with torch.no_grad():
        for got, want, what in zip(exported(hidden, mask), projection(hidden, mask), ("video", "audio"), strict=True):
            assert torch.equal(got, want), f"exported {what} context differs from eager"
    if version is ModelVersion.LTX2:  # the encoder does not depend on the version
        encoder = load_gemma(gemma_dir, dtype=torch.float32)
        ids, ids_mask = encoder.tokenizer(PROMPT)
        exported = torch.export.export(encoder, (ids, ids_mask)).module()
        with torch.no_grad():
            assert torch.equal(exported(ids, ids_mask), encoder(ids, ids_mask)), "exported Gemma differs from eager"


def test_tiny_gemma_preset_equals_the_official_config_object() -> None:
    """builder/presets/tiny-gemma3.json (read without ltx-core) is exactly ltx-core's tiny config object."""
    assert tiny_gemma_config_data().to_dict() == tiny_gemma_config_dict()
