"""Stage dit: parity with ltx-core's LTXModel at the tiny config, both versions, fp32 CPU (plus a bf16 check).

Inputs are built the official way: `VideoLatentTools` / `AudioLatentTools` positions, `Modality`, a denoise
mask whose first latent frame is conditioning (timestep 0) and the rest sigma, different sigmas for video and
audio (so a swapped cross-modal sigma shows), `BatchedPerturbationConfig.empty(B)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_rel_close
from oracle import official_load, write_official_checkpoint
from torch import nn

from fvrt import load_checkpoint
from fvrt.builder.checkpoint import CheckpointError, ModelVersion, build_random, stage_spec
from fvrt.builder.configs import full_config, tiny_config
from fvrt.builder.models import dit as D

B = 1
F_LAT, H_LAT, W_LAT = 3, 2, 3  # 18 video tokens, the first 6 (latent frame 0) conditioning
N_AUDIO = 12
N_TEXT = 128  # the pipelines use 1024; nothing in the DiT depends on it
FPS = 24.0
SIGMA_V, SIGMA_A = 0.7, 0.45


def official_dit(config: dict, seed: int) -> nn.Module:
    """`oracle.official_random("dit", ...)`, but with the 19B caption projections materialised: ltx-core builds
    them on the meta device (`model_configurator._build_caption_projections`) and official_random leaves them
    there (randomising a meta tensor is a no-op, so the checkpoint writer fails on them)."""
    from ltx_core.model.transformer import LTXModelConfigurator

    module = LTXModelConfigurator.from_config(dict(config)).to_empty(device="cpu").to(torch.float32)
    stage_spec("dit").randomize(module, torch.Generator().manual_seed(seed))
    return module.eval()


def context_widths(version: ModelVersion, config: dict) -> tuple[int, int]:
    tr = config["transformer"]
    if version is ModelVersion.LTX2:  # raw connector outputs, projected inside the DiT
        return tr["caption_channels"], tr["caption_channels"]
    return tr["num_attention_heads"] * tr["attention_head_dim"], tr["audio_num_attention_heads"] * tr[
        "audio_attention_head_dim"
    ]


def official_modalities(version: ModelVersion, config: dict, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(video Modality, audio Modality) as the official pipelines build them."""
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier
    from ltx_core.model.transformer import Modality
    from ltx_core.tools import AudioLatentTools, VideoLatentTools
    from ltx_core.types import AudioLatentShape, VideoLatentShape

    gen = torch.Generator().manual_seed(seed)
    vtools = VideoLatentTools(VideoLatentPatchifier(patch_size=1), VideoLatentShape(B, 128, F_LAT, H_LAT, W_LAT), FPS)
    atools = AudioLatentTools(AudioPatchifier(patch_size=1), AudioLatentShape(B, 8, N_AUDIO, 16))
    vstate = vtools.create_initial_state(
        "cpu", dtype, torch.randn(B, 128, F_LAT, H_LAT, W_LAT, generator=gen).to(dtype)
    )
    astate = atools.create_initial_state("cpu", dtype, torch.randn(B, 8, N_AUDIO, 16, generator=gen).to(dtype))
    vmask = vstate.denoise_mask.clone()  # [B, Nv, 1]
    vmask[:, : H_LAT * W_LAT] = 0.0  # image-conditioned first latent frame
    sv, sa = torch.tensor(SIGMA_V), torch.tensor(SIGMA_A)  # 0-d, as `sigmas[step_index]`
    cw_v, cw_a = context_widths(version, config)
    ctx_v = torch.randn(B, N_TEXT, cw_v, generator=gen).to(dtype)
    ctx_a = torch.randn(B, N_TEXT, cw_a, generator=gen).to(dtype)
    video = Modality(latent=vstate.latent, sigma=sv, timesteps=vmask * sv, positions=vstate.positions, context=ctx_v)
    audio = Modality(
        latent=astate.latent, sigma=sa, timesteps=astate.denoise_mask * sa, positions=astate.positions, context=ctx_a
    )
    return video, audio


def run_official(model: nn.Module, video: object, audio: object) -> tuple[torch.Tensor, torch.Tensor]:
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig

    with torch.no_grad():
        return model(video, audio, BatchedPerturbationConfig.empty(B))


def run_fvrt(model: D.LTXDiT, video: object, audio: object) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(
            video.latent,
            audio.latent,
            video_timesteps=video.timesteps,
            audio_timesteps=audio.timesteps,
            video_sigma=video.sigma,
            audio_sigma=audio.sigma,
            video_positions=video.positions,
            audio_positions=audio.positions,
            video_context=video.context,
            audio_context=audio.context,
        )


@pytest.fixture
def written(tmp_path: Path, version: ModelVersion) -> tuple[dict, nn.Module, Path]:
    cfg = tiny_config(version)
    official = official_dit(cfg, seed=5)
    path = write_official_checkpoint(tmp_path / "dit.safetensors", cfg, {"dit": official})
    return cfg, official, path


# ---------------------------------------------------------------------------------------------------------------


def test_dit_matches_official(written: tuple[dict, nn.Module, Path], version: ModelVersion) -> None:
    cfg, official, path = written
    ours = load_checkpoint(path, stages=["dit"], dtype=torch.float32).dit
    video, audio = official_modalities(version, cfg, torch.float32, seed=1)
    assert video.timesteps.unique().numel() == 2  # conditioning (0) and noisy (sigma) tokens
    ov, oa = run_official(official, video, audio)
    fv, fa = run_fvrt(ours, video, audio)
    assert_rel_close(fv, ov, 1e-5, "video velocity")
    assert_rel_close(fa, oa, 1e-5, "audio velocity")


def test_dit_matches_official_bf16(written: tuple[dict, nn.Module, Path], version: ModelVersion) -> None:
    """bf16 as the official pipelines run it (video positions cast to bf16, audio positions float32). The two
    implementations round in different places, so the bound is loose; it catches dtype mishandling."""
    cfg, official, path = written
    ours = load_checkpoint(path, stages=["dit"], dtype=torch.bfloat16).dit
    video, audio = official_modalities(version, cfg, torch.bfloat16, seed=2)
    assert video.positions.dtype == torch.bfloat16 and audio.positions.dtype == torch.float32
    ov, oa = run_official(official.to(torch.bfloat16), video, audio)
    fv, fa = run_fvrt(ours, video, audio)
    assert fv.dtype == torch.bfloat16 and fa.dtype == torch.bfloat16
    assert_rel_close(fv, ov, 2e-2, "video velocity (bf16)")
    assert_rel_close(fa, oa, 2e-2, "audio velocity (bf16)")


def prepare_modalities(model: D.LTXDiT, video: Any, audio: Any) -> tuple[D.StreamInputs, D.StreamInputs]:
    """`LTXDiT.prepare` on the fields of official `Modality` objects (fp32)."""
    return model.prepare(
        video_timesteps=video.timesteps,
        audio_timesteps=audio.timesteps,
        video_sigma=video.sigma,
        audio_sigma=audio.sigma,
        video_positions=video.positions,
        audio_positions=audio.positions,
        dtype=torch.float32,
    )


def test_prepared_adaln_equals_per_token(written: tuple[dict, nn.Module, Path], version: ModelVersion) -> None:
    """Per-unique-timestep AdaLN + per-token gather == the official per-token adaln_single outputs."""
    cfg, official, path = written
    ours = load_checkpoint(path, stages=["dit"], dtype=torch.float32).dit
    video, audio = official_modalities(version, cfg, torch.float32, seed=3)
    vin, ain = prepare_modalities(ours, video, audio)
    assert vin.adaln.shape[1] == 2 and ain.adaln.shape[1] == 1  # K unique timesteps, not T tokens
    scale = cfg["transformer"]["timestep_scale_multiplier"]
    for s, mod, adaln in ((vin, video, official.adaln_single), (ain, audio, official.audio_adaln_single)):
        with torch.no_grad():
            per_token, emb_token = adaln((mod.timesteps * scale).flatten(), hidden_dtype=torch.float32)
        n = mod.timesteps.shape[1]
        index = s.timestep_index.unsqueeze(-1)
        gathered = torch.gather(s.adaln, 1, index.expand(-1, -1, s.adaln.shape[-1]))
        gathered_emb = torch.gather(s.embedded, 1, index.expand(-1, -1, s.embedded.shape[-1]))
        # the timestep MLP runs on K rows here and on T rows there: fp32 GEMMs of other row counts may block and
        # round differently (1.02e-6 on one CPU machine, below 1e-6 on another), so a few ulps, not bits
        assert_rel_close(gathered, per_token.view(B, n, -1), 1e-5, "adaln per token")
        assert_rel_close(gathered_emb, emb_token.view(B, n, -1), 1e-5, "embedded timestep per token")
    # the block-level helper vs the official get_ada_values (table + per-token rows). Not bitwise: the adaln
    # Linear on K rows and on T rows may round differently (matmul blocking).
    block = ours.transformer_blocks[1]
    d = block.scale_shift_table.shape[-1]
    rows = block.scale_shift_table.shape[0]
    n = video.timesteps.shape[1]
    with torch.no_grad():
        per_token, _ = official.adaln_single((video.timesteps * scale).flatten(), hidden_dtype=torch.float32)
        expected = block.scale_shift_table[None, None] + per_token.view(B, n, rows, d)
        for row in range(rows):
            got = D._token_rows(block.scale_shift_table, vin.adaln, vin.timestep_index, row)
            assert_rel_close(got, expected[:, :, row], 1e-6, f"block AdaLN row {row}")


def test_unique_timesteps() -> None:
    torch.manual_seed(0)
    t = torch.tensor([[0.0, 0.3, 0.3, 0.0, 0.3], [0.3, 0.3, 0.3, 0.3, 0.3]])
    values, index = D.unique_timesteps(t.unsqueeze(-1))
    assert values.shape == (2, 2) and index.shape == (2, 5) and index.dtype == torch.int64
    assert torch.equal(values.gather(1, index), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rope_tables_match_official(version: ModelVersion, dtype: torch.dtype) -> None:
    """Self and A<->V RoPE tables equal `precompute_freqs_cis` as the official preprocessors call it."""
    from ltx_core.model.transformer.rope import LTXRopeType, generate_freq_grid_np, precompute_freqs_cis

    cfg = tiny_config(version)
    tr = cfg["transformer"]
    with torch.device("meta"):
        model = D.build_dit(cfg)
    vpos = D.video_positions(5, 3, 4, 25.0, dtype=dtype)  # fps 25: times not exact in bf16
    apos = D.audio_positions(9)
    ours = model.prepare_rope(vpos, apos, dtype)
    dv = tr["num_attention_heads"] * tr["attention_head_dim"]
    da = tr["audio_num_attention_heads"] * tr["audio_attention_head_dim"]
    cross_max = max(tr["positional_embedding_max_pos"][0], tr["audio_positional_embedding_max_pos"][0])
    calls = (
        (vpos, dv, tr["positional_embedding_max_pos"], tr["num_attention_heads"]),
        (apos, da, tr["audio_positional_embedding_max_pos"], tr["audio_num_attention_heads"]),
        (vpos[:, 0:1], tr["audio_cross_attention_dim"], [cross_max], tr["num_attention_heads"]),
        (apos[:, 0:1], tr["audio_cross_attention_dim"], [cross_max], tr["audio_num_attention_heads"]),
    )
    for (pos, dim, max_pos, heads), (cos, sin), what in zip(
        calls, ours, ("video", "audio", "v cross", "a cross"), strict=True
    ):
        ocos, osin = precompute_freqs_cis(
            pos,
            dim=dim,
            out_dtype=dtype,
            theta=tr["positional_embedding_theta"],
            max_pos=max_pos,
            use_middle_indices_grid=True,
            num_attention_heads=heads,
            rope_type=LTXRopeType.SPLIT,
            freq_grid_generator=generate_freq_grid_np,
        )
        assert cos.shape == ocos.shape and cos.dtype == ocos.dtype, what
        assert torch.equal(cos, ocos) and torch.equal(sin, osin), f"{what} RoPE tables differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fps", [24.0, 25.0, 30.0])
def test_positions_match_official_tools(dtype: torch.dtype, fps: float) -> None:
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier
    from ltx_core.tools import AudioLatentTools, VideoLatentTools
    from ltx_core.types import AudioLatentShape, VideoLatentShape

    vtools = VideoLatentTools(VideoLatentPatchifier(patch_size=1), VideoLatentShape(2, 128, 6, 3, 5), fps)
    expected = vtools.create_initial_state("cpu", dtype).positions
    got = D.video_positions(6, 3, 5, fps, batch=2, dtype=dtype)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    atools = AudioLatentTools(AudioPatchifier(patch_size=1), AudioLatentShape(2, 8, 31, 16))
    expected = atools.create_initial_state("cpu", dtype).positions
    got = D.audio_positions(31, batch=2)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_patchify_matches_official() -> None:
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier
    from ltx_core.types import AudioLatentShape, VideoLatentShape

    torch.manual_seed(0)
    v = torch.randn(2, 128, 3, 2, 4)
    a = torch.randn(2, 8, 7, 16)
    vt = VideoLatentPatchifier(patch_size=1).patchify(v)
    at = AudioPatchifier(patch_size=1).patchify(a)
    assert torch.equal(D.patchify_video(v), vt) and torch.equal(D.patchify_audio(a), at)
    assert torch.equal(D.unpatchify_video(vt, 3, 2, 4), v) and torch.equal(D.unpatchify_audio(at, 8), a)
    assert torch.equal(
        VideoLatentPatchifier(patch_size=1).unpatchify(vt, VideoLatentShape(2, 128, 3, 2, 4)),
        D.unpatchify_video(vt, 3, 2, 4),
    )
    assert torch.equal(AudioPatchifier(patch_size=1).unpatchify(at, AudioLatentShape(2, 8, 7, 16)), a)


def test_official_loader_accepts_checkpoint(written: tuple[dict, nn.Module, Path]) -> None:
    _, official, path = written
    loaded = official_load("dit", path)
    expected = official.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for k, t in expected.items():
        assert torch.equal(got[k], t), k


def test_state_dict_matches_official_full_size(version: ModelVersion) -> None:
    """Names and shapes of the released sizes (both built on meta), and the parameter count."""
    from ltx_core.model.transformer import LTXModelConfigurator

    cfg = full_config(version)
    with torch.device("meta"):
        official = LTXModelConfigurator.from_config(cfg)
        ours = D.build_dit(cfg)
    expected = {k: tuple(t.shape) for k, t in official.state_dict().items()}
    assert {k: tuple(t.shape) for k, t in ours.state_dict().items()} == expected
    n = D.count_parameters(cfg)
    assert n == sum(p.numel() for p in official.parameters())
    # ltx2-architecture.md §2.2: 18.88 B (19B) / 18.99 B (2.3) without the connectors
    assert round(n / 1e9, 2) == (18.88 if version is ModelVersion.LTX2 else 18.99)


def test_stage_rules() -> None:
    spec = stage_spec("dit")
    p = "model.diffusion_model."
    assert spec.module_key(p + "video_embeddings_connector.learnable_registers") is None
    assert spec.module_key(p + "audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight") is None
    assert spec.module_key(p + "transformer_blocks.3.attn1.to_q.weight") == "transformer_blocks.3.attn1.to_q.weight"
    assert spec.module_key("vae.decoder.conv_in.conv.weight") is None
    assert spec.checkpoint_key("proj_out.bias") == p + "proj_out.bias"


def test_blocks_are_uniform(version: ModelVersion) -> None:
    """One block module run on another layer's weights (torch.func.functional_call) == that layer: the shape of
    a compile-once, apply-48-times runner."""
    torch.manual_seed(0)
    cfg = tiny_config(version)
    model = build_random("dit", cfg, seed=7)
    video, audio = official_modalities(version, cfg, torch.float32, seed=4)
    vin, ain = prepare_modalities(model, video, audio)
    ctx_v, ctx_a = model.prepare_context(video.context, audio.context)
    blocks = model.transformer_blocks
    shapes = [{k: t.shape for k, t in b.state_dict().items()} for b in blocks]
    assert all(s == shapes[0] for s in shapes)
    vx = torch.randn(B, video.latent.shape[1], vin.embedded.shape[-1])
    ax = torch.randn(B, audio.latent.shape[1], ain.embedded.shape[-1])
    with torch.no_grad():
        direct = blocks[1](vx, ax, ctx_v, ctx_a, vin, ain)
        swapped = torch.func.functional_call(blocks[0], dict(blocks[1].state_dict()), (vx, ax, ctx_v, ctx_a, vin, ain))
    assert torch.equal(direct[0], swapped[0]) and torch.equal(direct[1], swapped[1])


def test_forward_prepared_exports(version: ModelVersion) -> None:
    """The hot graph exports (no data-dependent control flow) and the exported program matches eager."""
    cfg = tiny_config(version)
    model = build_random("dit", cfg, seed=8)
    video, audio = official_modalities(version, cfg, torch.float32, seed=5)
    vin, ain = prepare_modalities(model, video, audio)
    ctx_v, ctx_a = model.prepare_context(video.context, audio.context)

    class Hot(nn.Module):
        def __init__(self, dit: D.LTXDiT) -> None:
            super().__init__()
            self.dit = dit

        def forward(self, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
            return self.dit.forward_prepared(*args)

    args = (video.latent, audio.latent, ctx_v, ctx_a, vin, ain)
    with torch.no_grad():
        program = torch.export.export(Hot(model), args)
        got = program.module()(*args)
        want = model.forward_prepared(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rope_type", "interleaved", "rope_type"),
        ("frequencies_precision", "float32", "frequencies_precision"),
        ("cross_attention_dim", 24, "cross_attention_dim"),
        ("audio_num_attention_heads", 4, "head counts"),
        ("qk_norm", "layer_norm", "qk_norm"),
    ],
)
def test_refuses_unsupported_configs(version: ModelVersion, key: str, value: object, message: str) -> None:
    cfg = tiny_config(version)
    cfg["transformer"][key] = value
    if key == "audio_num_attention_heads":  # keep the audio width, change only the head layout
        cfg["transformer"]["audio_attention_head_dim"] = 2
    with pytest.raises(CheckpointError, match=message):
        D.build_dit(cfg)
    cfg = tiny_config(version)
    del cfg["transformer"]["timestep_scale_multiplier"]
    with pytest.raises(CheckpointError, match="timestep_scale_multiplier"):
        D.build_dit(cfg)
