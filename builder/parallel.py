"""Sequence-parallel (Ulysses) LTX DiT: one video's DiT pass on several ranks of a `torch.distributed` group.

Layout (docs/parallel.md has the reasoning and the byte counts):

- The **video** token sequence is split in contiguous blocks over the P ranks, rank r holding tokens
  [r * n, (r + 1) * n) with n = ceil(Nv / P). When P does not divide Nv, the sequence is padded at its end
  with P * n - Nv tokens (zero latents, timestep index 0, identity RoPE); padded tokens are never used as
  keys or values (each attention slices them off after its all-to-all), so the real tokens' results do not
  depend on them, and they are dropped when the output is gathered.
- The **audio** tokens (126 at 5 s) are replicated: every rank runs the whole audio stream on identical
  inputs, so it stays identical on every rank without communication.
- Per-token quantities (RoPE tables, the AdaLN timestep index) are computed for the whole sequence by
  `LTXDiT.prepare` and each rank takes its slice: every token keeps its global position.

Per block, the communication is confined to two attentions (`parallelize_blocks` swaps them in place):

- video self-attention (`UlyssesSelfAttention`): Q/K/V are projected, QK-normed (RMSNorm across all heads,
  hence before the exchange) and rotated on the local tokens, then one all-to-all turns the stacked Q, K, V
  from sequence-sharded [B, H, n, D] into head-sharded [B, H/P, P*n, D]; attention runs on H/P heads over the
  whole sequence; a second all-to-all turns the output back; the per-head gate and the output projection are
  local. P must divide the head count (32 in both released models: P in 1, 2, 4, 8, 16, 32).
- video -> audio cross-attention (`VideoToAudioAttention`): the replicated audio queries need every video
  key and value. Default `kv_exchange="all_to_all"`: K and V go sequence-sharded -> head-sharded (the same
  all-to-all), each rank attends the audio queries of its H/P heads, and an all-gather of the small
  [B, H/P, Na, D] outputs rebuilds all heads. `"all_gather"` gathers the whole K and V on every rank instead
  (P times the bytes, every rank computing every head).
- audio -> video cross-attention (local video queries, replicated audio keys), text cross-attention, the
  feed-forwards, AdaLN and the output heads are per token: unchanged and local.

Collectives are the functional ones (`torch.distributed._functional_collectives`: `_c10d_functional` ops),
which torch.export traces and AOTInductor compiles. This module is the eager, builder-side form; engines per
rank, the manifest's world size and `fvrt-run --gpus N` are not built yet (docs/parallel.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn

from fvrt.builder.models.common import Attention, RopeTables, apply_split_rope, sdpa
from fvrt.builder.models.dit import LTXDiT, StreamInputs

KVExchange = Literal["all_to_all", "all_gather"]


class ShardLayout(NamedTuple):
    """How `tokens` video tokens are split over `world_size` ranks; rank `rank`'s view."""

    tokens: int
    world_size: int
    rank: int

    @property
    def local(self) -> int:
        """Tokens per rank (the padded sequence is `local * world_size` long)."""
        return math.ceil(self.tokens / self.world_size)

    @property
    def padded(self) -> int:
        return self.local * self.world_size

    @property
    def pad(self) -> int:
        return self.padded - self.tokens

    def take(self, x: torch.Tensor, dim: int, fill: float = 0.0) -> torch.Tensor:
        """This rank's block of `x` along `dim` (the token axis), padded with `fill` past the sequence end."""
        if self.pad:
            shape = list(x.shape)
            shape[dim] = self.pad
            x = torch.cat([x, x.new_full(shape, fill)], dim=dim)
        return x.narrow(dim, self.rank * self.local, self.local)


def shard_layout(tokens: int, heads: int, world_size: int, rank: int) -> ShardLayout:
    """Rank `rank`'s layout of `tokens` video tokens over `world_size` ranks; refuses a world size that does
    not divide `heads` (Ulysses gives each rank whole heads) or exceeds the token count."""
    if heads % world_size:
        raise ValueError(f"world size {world_size} does not divide the {heads} attention heads (Ulysses splits heads)")
    if tokens < world_size:
        raise ValueError(f"{tokens} video tokens cannot be split over {world_size} ranks")
    return ShardLayout(tokens, world_size, rank)


# --------------------------------------------------------------------------------------------------------------
# collectives (functional: traceable into engines)


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Block j of dim 0 goes to rank j; block j of the result came from rank j."""
    return fc.wait_tensor(fc.all_to_all_single(x.contiguous(), None, None, group))


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenation over dim 0 of every rank's `x`, in rank order."""
    return fc.wait_tensor(fc.all_gather_single(x.contiguous(), 0, group))


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H, n, D] sequence-sharded (this rank's n tokens, all heads) -> [B, H/P, P*n, D] head-sharded (this
    rank's H/P heads, all tokens in global order). One all-to-all of B*H*n*D elements."""
    p = dist.get_world_size(group)
    b, h, n, d = x.shape
    send = x.view(b, p, h // p, n, d).transpose(0, 1)  # [P (destination: head block), B, H/P, n, D]
    recv = _all_to_all(send, group)  # [P (source: token block), B, H/P, n, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of `seq_to_heads`: [B, H/P, P*n, D] -> [B, H, n, D]."""
    p = dist.get_world_size(group)
    b, hl, t, d = x.shape
    send = x.view(b, hl, p, t // p, d).permute(2, 0, 1, 3, 4)  # [P (destination: token block), B, H/P, n, D]
    recv = _all_to_all(send, group)  # [P (source: head block), B, H/P, n, D]
    return recv.transpose(0, 1).reshape(b, hl * p, t // p, d)


def gather_tokens(x: torch.Tensor, layout: ShardLayout, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, n, C] per rank -> [B, Nv, C] on every rank (padding dropped)."""
    return _all_gather(x.transpose(0, 1), group)[: layout.tokens].transpose(0, 1)


# --------------------------------------------------------------------------------------------------------------
# the two attentions that communicate


@dataclass
class _State:
    """Shared by a model's parallel attentions: the layout of the pass in progress (set by
    `SequenceParallelDiT`; None outside a pass)."""

    group: dist.ProcessGroup
    layout: ShardLayout | None = None

    def current(self) -> ShardLayout:
        if self.layout is None:
            raise RuntimeError("a sequence-parallel attention ran outside SequenceParallelDiT")
        return self.layout


class _ParallelAttention(nn.Module):
    """Holds an `Attention`'s submodules under the same names (the state dict is unchanged)."""

    def __init__(self, attn: Attention, state: _State) -> None:
        super().__init__()
        self.heads, self.dim_head = attn.heads, attn.dim_head
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.to_q, self.to_k, self.to_v = attn.to_q, attn.to_k, attn.to_v
        self.to_gate_logits = attn.to_gate_logits
        self.to_out = attn.to_out
        self.state = state

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def _qkv(
        self, x: torch.Tensor, context: torch.Tensor, pe: RopeTables, k_pe: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections, QK norm (across all heads) and RoPE, as `Attention.forward`: [B, H, T, D] each."""
        q = apply_split_rope(self._heads(self.q_norm(self.to_q(x))), *pe)
        k = apply_split_rope(self._heads(self.k_norm(self.to_k(context))), *k_pe)
        return q, k, self._heads(self.to_v(context))

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head gate from the queries' input and the output projection: [B, H, Tq, D] -> [B, Tq, dq]."""
        if self.to_gate_logits is not None:
            out = out * (2.0 * torch.sigmoid(self.to_gate_logits(x))).transpose(1, 2).unsqueeze(-1)
        b, _, tq, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, tq, self.heads * self.dim_head))


class UlyssesSelfAttention(_ParallelAttention):
    """Video self-attention on sequence-sharded tokens: all-to-all to head-sharded, attention over the whole
    (unpadded) sequence, all-to-all back."""

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        pe: RopeTables | None = None,
        k_pe: RopeTables | None = None,
    ) -> torch.Tensor:
        """x: [B, n, d] this rank's tokens; pe: their RoPE tables [B, H, n, D/2]. Returns [B, n, d]."""
        if context is not None or pe is None or k_pe is not None:
            raise ValueError("UlyssesSelfAttention is the video self-attention: no context, one RoPE table")
        layout, group = self.state.current(), self.state.group
        q, k, v = self._qkv(x, x, pe, pe)
        b = x.shape[0]
        q, k, v = seq_to_heads(torch.cat([q, k, v]), group).split(b)  # one all-to-all for the three
        out = sdpa(q, k[:, :, : layout.tokens], v[:, :, : layout.tokens])  # padded tokens are no keys
        return self._finish(heads_to_seq(out, group), x)


class VideoToAudioAttention(_ParallelAttention):
    """Audio queries (replicated) over the video keys/values (sequence-sharded)."""

    def __init__(self, attn: Attention, state: _State, kv_exchange: KVExchange) -> None:
        super().__init__(attn, state)
        if kv_exchange not in ("all_to_all", "all_gather"):
            raise ValueError(f"kv_exchange must be 'all_to_all' or 'all_gather', got {kv_exchange!r}")
        self.kv_exchange = kv_exchange

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        pe: RopeTables | None = None,
        k_pe: RopeTables | None = None,
    ) -> torch.Tensor:
        """x: [B, Na, da] audio (all ranks); context: [B, n, dv] this rank's video tokens; pe / k_pe: A<->V RoPE
        of the audio [B, H, Na, Dc/2] and of this rank's video tokens [B, H, n, Dc/2]. Returns [B, Na, da]."""
        if context is None or pe is None or k_pe is None:
            raise ValueError("VideoToAudioAttention needs the video context and both RoPE tables")
        layout, group = self.state.current(), self.state.group
        q, k, v = self._qkv(x, context, pe, k_pe)
        b, real = x.shape[0], layout.tokens
        if self.kv_exchange == "all_gather":
            kv = _all_gather(torch.cat([k, v]).permute(2, 0, 1, 3), group)[:real]  # [Nv, 2B, H, D]
            k, v = kv.permute(1, 2, 0, 3).split(b)
            return self._finish(sdpa(q, k, v), x)
        k, v = seq_to_heads(torch.cat([k, v]), group).split(b)  # [B, H/P, P*n, D]
        hl = k.shape[1]
        q = q[:, layout.rank * hl : (layout.rank + 1) * hl]
        out = sdpa(q, k[:, :, :real], v[:, :, :real])  # [B, H/P, Na, D]
        out = _all_gather(out.transpose(0, 1), group)  # [H, B, Na, D], heads in rank order
        return self._finish(out.transpose(0, 1), x)


def parallelize_blocks(model: LTXDiT, state: _State, kv_exchange: KVExchange) -> None:
    """Swap each block's video self-attention and video->audio attention for their parallel forms, in place
    (same parameters, same state-dict names). A model swapped before is rebound to `state` and `kv_exchange`."""
    for block in model.transformer_blocks:
        if isinstance(block.attn1, UlyssesSelfAttention):  # parallelized before: rebind to the new state
            block.attn1.state = block.video_to_audio_attn.state = state
            block.video_to_audio_attn.kv_exchange = kv_exchange
        else:
            block.attn1 = UlyssesSelfAttention(block.attn1, state)
            block.video_to_audio_attn = VideoToAudioAttention(block.video_to_audio_attn, state, kv_exchange)


# --------------------------------------------------------------------------------------------------------------
# the model


def shard_stream(s: StreamInputs, layout: ShardLayout) -> StreamInputs:
    """This rank's slice of the video `StreamInputs`: the per-token fields (timestep index, RoPE tables) cut
    at the rank's global token positions; padding gets index 0 and the identity rotation (cos 1, sin 0)."""
    return s._replace(
        timestep_index=layout.take(s.timestep_index, 1, 0),
        pe_cos=layout.take(s.pe_cos, 2, 1.0),
        pe_sin=layout.take(s.pe_sin, 2, 0.0),
        cross_pe_cos=layout.take(s.cross_pe_cos, 2, 1.0),
        cross_pe_sin=layout.take(s.cross_pe_sin, 2, 0.0),
    )


class SequenceParallelDiT:
    """An `LTXDiT` run by every rank of `group` on its slice of the video tokens, with the results of the
    single-process model. Construction swaps two attentions per block in place (`parallelize_blocks`): every
    rank holds the whole model (same weights on every rank), and the model must only be called through
    this object afterwards."""

    def __init__(
        self,
        model: LTXDiT,
        group: dist.ProcessGroup | None = None,
        *,
        kv_exchange: KVExchange = "all_to_all",
    ) -> None:
        self.model = model
        self.group = group if group is not None else dist.group.WORLD
        self._state = _State(self.group)
        parallelize_blocks(model, self._state, kv_exchange)

    @contextlib.contextmanager
    def bound(self, layout: ShardLayout) -> Iterator[None]:
        """Within this block the model's parallel attentions run with `layout`: the model itself
        (`model.forward_prepared` on this rank's shard, as `forward_prepared` calls it) can be traced or
        exported per rank."""
        self._state.layout = layout
        try:
            yield
        finally:
            self._state.layout = None

    def layout(self, tokens: int) -> ShardLayout:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        return shard_layout(tokens, self.model.cfg.heads, world, rank)

    def forward_prepared(
        self,
        video_latent: torch.Tensor,
        audio_latent: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
        video: StreamInputs,
        audio: StreamInputs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`LTXDiT.forward_prepared` on the whole inputs (identical on every rank); returns the whole velocities
        (video [B, Nv, 128], audio [B, Na, 128]) on every rank."""
        layout = self.layout(video_latent.shape[1])
        with self.bound(layout):
            vel_v, vel_a = self.model.forward_prepared(
                layout.take(video_latent, 1),
                audio_latent,
                video_context,
                audio_context,
                shard_stream(video, layout),
                audio,
            )
        return gather_tokens(vel_v, layout, self.group), vel_a

    def __call__(
        self,
        video_latent: torch.Tensor,
        audio_latent: torch.Tensor,
        *,
        video_timesteps: torch.Tensor,
        audio_timesteps: torch.Tensor,
        video_sigma: torch.Tensor,
        audio_sigma: torch.Tensor,
        video_positions: torch.Tensor,
        audio_positions: torch.Tensor,
        video_context: torch.Tensor,
        audio_context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`LTXDiT.forward`, sequence-parallel: same arguments (whole tensors on every rank), same results."""
        video, audio = self.model.prepare(
            video_timesteps=video_timesteps,
            audio_timesteps=audio_timesteps,
            video_sigma=video_sigma,
            audio_sigma=audio_sigma,
            video_positions=video_positions,
            audio_positions=audio_positions,
            dtype=video_latent.dtype,
        )
        ctx_v, ctx_a = self.model.prepare_context(video_context, audio_context)
        return self.forward_prepared(video_latent, audio_latent, ctx_v, ctx_a, video, audio)


__all__ = [
    "KVExchange",
    "SequenceParallelDiT",
    "ShardLayout",
    "UlyssesSelfAttention",
    "VideoToAudioAttention",
    "gather_tokens",
    "heads_to_seq",
    "parallelize_blocks",
    "seq_to_heads",
    "shard_layout",
    "shard_stream",
]
