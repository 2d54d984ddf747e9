"""Sequence-parallel DiT (fvrt.builder.parallel) and the rank launcher (fvrt.runtime.distributed), on the CPU:
gloo, world sizes 2 and 4, tiny LTX-2 and LTX-2.3 DiTs in fp32 with random weights.

Each world size is one launch: every rank runs every case (both versions, a stage-1 and a stage-2 token grid,
with and without an image-conditioned first frame, both K/V exchanges of the video->audio attention) and
returns its velocities; the parent compares them with the single-process `LTXDiT.forward` on the same weights.
The stage-1 grid (45 tokens) divides neither 2 nor 4, so the padding path runs at both world sizes.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from fvrt.builder.checkpoint import ModelVersion, build_random
from fvrt.builder.configs import tiny_config
from fvrt.builder.models import dit as D
from fvrt.builder.parallel import SequenceParallelDiT, ShardLayout, shard_layout, shard_stream
from fvrt.runtime.distributed import RankError, run_ranks

GRIDS = {"stage1": (3, 3, 5), "stage2": (3, 6, 10)}  # latent (F, H, W): 45 and 180 video tokens
N_AUDIO = 12
N_TEXT = 16
FPS = 24.0
SIGMA_V, SIGMA_A = 0.7, 0.45
TOL = 1e-5  # max abs, fp32
# every version x grid x conditioning with the default K/V all-to-all, plus the all-gather alternative on LTX-2.3
CASES = [
    *itertools.product((ModelVersion.LTX2, ModelVersion.LTX23), GRIDS, (False, True), ("all_to_all",)),
    *itertools.product((ModelVersion.LTX23,), GRIDS, (True,), ("all_gather",)),
]
COLLECTIVE_TIMEOUT_S = 20.0


def sp_config(version: ModelVersion) -> dict[str, Any]:
    """The tiny config with 4 heads (Ulysses splits heads: world size 4 needs at least 4)."""
    cfg = tiny_config(version)
    cfg["transformer"].update(
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        audio_num_attention_heads=4,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=16,
    )
    return cfg


def case_inputs(version: ModelVersion, grid: str, conditioned: bool, cfg: dict[str, Any]) -> dict[str, Any]:
    """`LTXDiT.forward` arguments, the same in every process (seeded)."""
    f, h, w = GRIDS[grid]
    gen = torch.Generator().manual_seed(list(GRIDS).index(grid) * 4 + 2 * conditioned + (version is ModelVersion.LTX23))
    nv = f * h * w
    tv = torch.full((1, nv, 1), SIGMA_V)
    if conditioned:
        tv[:, : h * w] = 0.0  # image-conditioned first latent frame: a second timestep value, index 0 / 1
    tr = cfg["transformer"]
    # LTX-2: raw connector outputs (projected inside the DiT); LTX-2.3: the stream widths
    cw = (
        (tr["caption_channels"],) * 2
        if version is ModelVersion.LTX2
        else (tr["cross_attention_dim"], tr["audio_cross_attention_dim"])
    )
    return {
        "video_latent": torch.randn(1, nv, 128, generator=gen),
        "audio_latent": torch.randn(1, N_AUDIO, 128, generator=gen),
        "video_timesteps": tv,
        "audio_timesteps": torch.full((1, N_AUDIO, 1), SIGMA_A),
        "video_sigma": torch.tensor(SIGMA_V),
        "audio_sigma": torch.tensor(SIGMA_A),
        "video_positions": D.video_positions(f, h, w, FPS),
        "audio_positions": D.audio_positions(N_AUDIO),
        "video_context": torch.randn(1, N_TEXT, cw[0], generator=gen),
        "audio_context": torch.randn(1, N_TEXT, cw[1], generator=gen),
    }


def model_for(version: ModelVersion) -> D.LTXDiT:
    return build_random("dit", sp_config(version), seed=11).eval()


def parallel_cases(rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank body: every case through `SequenceParallelDiT`. One model per version: the second K/V exchange
    re-wraps an already parallelized model."""
    models = {version: model_for(version) for version in (ModelVersion.LTX2, ModelVersion.LTX23)}
    out = []
    for version, grid, conditioned, kv in CASES:
        sp = SequenceParallelDiT(models[version], kv_exchange=kv)
        with torch.no_grad():
            out.append(sp(**case_inputs(version, grid, conditioned, sp_config(version))))
    return out


# world size 4: four processes on the 2-core CI machine take more than 30 s (start-up included)
@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["ws2", "ws4"])
def parallel_results(request: pytest.FixtureRequest) -> tuple[int, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    world = request.param
    return world, run_ranks(parallel_cases, world, timeout_s=COLLECTIVE_TIMEOUT_S)


@pytest.mark.parametrize(("version", "grid", "conditioned", "kv"), CASES, ids=lambda v: getattr(v, "value", v))
def test_parallel_forward_equals_single_process(
    parallel_results: tuple[int, list[list[tuple[torch.Tensor, torch.Tensor]]]],
    version: ModelVersion,
    grid: str,
    conditioned: bool,
    kv: str,
) -> None:
    # Precondition: the single-process reference on the same weights and inputs
    world, per_rank = parallel_results
    inputs = case_inputs(version, grid, conditioned, sp_config(version))
    assert inputs["video_timesteps"].unique().numel() == (2 if conditioned else 1)
    with torch.no_grad():
        want_v, want_a = model_for(version)(**inputs)
    # Under test / Postcondition: every rank returns the whole velocities, equal to the reference
    index = CASES.index((version, grid, conditioned, kv))
    for rank, results in enumerate(per_rank):
        got_v, got_a = results[index]
        assert got_v.shape == want_v.shape and got_a.shape == want_a.shape
        err_v, err_a = (got_v - want_v).abs().max().item(), (got_a - want_a).abs().max().item()
        assert err_v <= TOL and err_a <= TOL, f"world {world} rank {rank}: max abs video {err_v:.2e} audio {err_a:.2e}"


def export_hot_graph(rank: int, world_size: int) -> tuple[list[str], float, float]:
    """Rank body: torch.export of the parallel hot graph (`forward_prepared` on this rank's shard); returns the
    collective ops in the graph and the exported program's max abs difference from eager."""
    version = ModelVersion.LTX23
    sp = SequenceParallelDiT(model_for(version))
    inputs = case_inputs(version, "stage1", True, sp_config(version))
    model = sp.model
    video, audio = model.prepare(
        **{k: inputs[k] for k in inputs if k.endswith(("timesteps", "sigma", "positions"))}, dtype=torch.float32
    )
    layout = sp.layout(inputs["video_latent"].shape[1])
    args = (
        layout.take(inputs["video_latent"], 1),
        inputs["audio_latent"],
        inputs["video_context"],
        inputs["audio_context"],
        shard_stream(video, layout),
        audio,
    )

    class Hot(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dit = model

        def forward(self, *a: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return self.dit.forward_prepared(*a)

    with sp.bound(layout), torch.no_grad():
        program = torch.export.export(Hot(), args)
        got = program.module()(*args)
        want = model.forward_prepared(*args)
    ops = sorted({str(n.target) for n in program.graph.nodes if "c10d" in str(n.target)})
    return ops, (got[0] - want[0]).abs().max().item(), (got[1] - want[1]).abs().max().item()


def test_parallel_hot_graph_exports() -> None:
    """The per-rank hot graph traces into `_c10d_functional` collectives (the ops AOTInductor compiles into an
    engine) and the exported program equals eager, on each rank."""
    for ops, err_v, err_a in run_ranks(export_hot_graph, 2, timeout_s=COLLECTIVE_TIMEOUT_S):
        assert ops == [
            "_c10d_functional.all_gather_into_tensor.default",
            "_c10d_functional.all_to_all_single.default",
            "_c10d_functional.wait_tensor.default",
        ]
        assert err_v == 0.0 and err_a == 0.0


# ---------------------------------------------------------------------------------------------------------------
# layout and refusals (no processes)


def test_shard_layout_pads_at_the_end() -> None:
    layouts = [ShardLayout(45, 4, r) for r in range(4)]
    assert [(la.local, la.padded, la.pad) for la in layouts[:1]] == [(12, 48, 3)]
    x = torch.arange(45.0).view(1, 45, 1)
    parts = [la.take(x, 1, fill=-1.0) for la in layouts]
    assert torch.equal(torch.cat(parts, 1)[0, :, 0], torch.cat([torch.arange(45.0), torch.full((3,), -1.0)]))


def test_refuses_world_size_not_dividing_heads() -> None:
    with pytest.raises(ValueError, match="world size 4 does not divide the 6 attention heads"):
        shard_layout(180, 6, 4, 0)
    with pytest.raises(ValueError, match="3 video tokens cannot be split over 4 ranks"):
        shard_layout(3, 8, 4, 0)
    assert shard_layout(45, 8, 4, 3) == ShardLayout(45, 4, 3)


# ---------------------------------------------------------------------------------------------------------------
# failures end every rank


def one_rank_raises(rank: int, world_size: int) -> None:
    """Rank 1 raises before the first collective; the others are inside the parallel forward."""
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    sp = SequenceParallelDiT(model_for(ModelVersion.LTX23))
    with torch.no_grad():
        sp(**case_inputs(ModelVersion.LTX23, "stage2", True, sp_config(ModelVersion.LTX23)))


def one_rank_is_killed(rank: int, world_size: int) -> None:
    """Rank 1 dies by SIGKILL (no report of its own) while rank 0 waits in a collective."""
    if rank == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def one_rank_hangs(rank: int, world_size: int) -> None:
    """Rank 1 never joins the collective: rank 0's all-gather must time out."""
    if rank == 1:
        time.sleep(120)
    dist.barrier()


def test_a_raising_rank_ends_every_rank() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match=r"^rank 1 of 2 failed: ValueError: rank 1 fails on purpose$") as info:
        run_ranks(one_rank_raises, 2, timeout_s=COLLECTIVE_TIMEOUT_S, kill_grace_s=0.0)
    # the other ranks ended with their own (collective) error, not killed by the parent
    others = [s for r, s in enumerate(info.value.statuses) if r != 1]
    assert all(s.startswith("RuntimeError: ") for s in others), info.value.statuses
    assert time.monotonic() - start < COLLECTIVE_TIMEOUT_S + 30  # process start included


def test_a_killed_rank_ends_every_rank() -> None:
    with pytest.raises(RankError, match=r"^rank 1 of 2 failed: killed by signal 9$") as info:
        run_ranks(one_rank_is_killed, 2, timeout_s=COLLECTIVE_TIMEOUT_S, kill_grace_s=0.0)
    assert info.value.statuses[0].startswith("RuntimeError: "), info.value.statuses  # ended by itself


def test_a_hanging_rank_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match=r"^rank 0 of 2 failed: .*[Tt]imed? ?out") as info:
        run_ranks(one_rank_hangs, 2, timeout_s=3.0, kill_grace_s=1.0)
    assert info.value.statuses[1] == "killed"
    assert time.monotonic() - start < 60
