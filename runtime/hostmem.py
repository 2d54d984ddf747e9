"""Page-locked host memory for the runtime's device <-> host copies, without cudaHostAlloc.

Page-locked (pinned) host memory makes copies fast (55 GB/s vs 7.4-13.5 GB/s pageable on the H100 host) and lets
host-to-device copies run asynchronously. torch's `pin_memory=True` gets it from cudaHostAlloc, which on the H100
host took 9.6-16.2 s for 23.5 GB (the bf16 text encoder's parked copy; three runs) and stalled every GPU kernel
meanwhile (200 GEMMs: 0.44 s alone, 11-16 s beside it). A pageable block, touched and then registered with
cudaHostRegister, took 2.0-5.4 s for the same 23.5 GB, with the same copy speed, and held GPU work up only for
the ~1 s of the registration (`lab/gpu_pinned_probe.py`; docs/results/2026-11-26-h100-bench-ndhwc-pinned.md has the runs
and what is not understood yet). So the runtime allocates a plain block, registers it, and hands out views into it;
the registration is undone when the last tensor taken from it is gone.

Without CUDA (or if registration fails) the block stays pageable: copies are then synchronous and slower, never
wrong.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence

import torch

ALIGN = 256  # bytes: every view starts on a boundary good for DMA and for any dtype's view


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _unregister(buf: torch.Tensor, synchronize: bool) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone; the memory goes with the process
        if synchronize:
            torch.cuda.synchronize()  # no asynchronous copy may still read or write the block
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


class HostArena:
    """One host block of `nbytes` (page-locked where CUDA is present) carved into tensors by `take`. Every tensor
    object taken keeps the arena alive; when the last is gone the block is unregistered. Views of those tensors
    (`.numpy()`, slices) stay valid after that, as pageable memory.
    `async_copies`: the block will be used with non_blocking copies, so the device is synchronised before it is
    unregistered."""

    def __init__(self, nbytes: int, *, pin: bool | None = None, async_copies: bool = False) -> None:
        self.buf = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
        self.pinned = False
        self._offset = -self.buf.data_ptr() % ALIGN  # the first view starts on a boundary too
        self._end = self._offset + nbytes
        if (torch.cuda.is_available() if pin is None else pin) and nbytes:
            # fault the pages in first (torch's parallel fill), then pin them: cheaper than letting the driver
            # fault them in one by one (H100 host, 23.5 GB: 1.0 + 1.1 s in the probe's best case)
            self.buf.fill_(0)
            rc = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.buf.numel(), 0)
            self.pinned = int(rc) == 0
            if self.pinned:
                weakref.finalize(self, _unregister, self.buf, async_copies)

    @staticmethod
    def size_for(shapes: Sequence[tuple[Sequence[int], torch.dtype]]) -> int:
        return sum(_aligned(_nbytes(s, d)) for s, d in shapes)

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` in the next free (aligned) part of the block."""
        n = _nbytes(shape, dtype)
        if self._offset + n > self._end:
            raise ValueError(f"host arena of {self._end - self._offset} free bytes is full ({n} bytes asked)")
        t = self.buf[self._offset : self._offset + n].view(dtype).view(tuple(shape))
        t._fvrt_arena = self  # type: ignore[attr-defined]  # the block lives as long as any tensor taken from it
        self._offset += _aligned(n)
        return t


def host_copies(tensors: Sequence[torch.Tensor], *, async_copies: bool = False) -> list[torch.Tensor]:
    """Host copies of `tensors` in one arena (page-locked where CUDA is present), copied synchronously."""
    arena = HostArena(HostArena.size_for([(t.shape, t.dtype) for t in tensors]), async_copies=async_copies)
    out = [arena.take(t.shape, t.dtype) for t in tensors]
    for h, t in zip(out, tensors, strict=True):
        h.copy_(t)
    return out


def host_copy_lists(lists: Sequence[Sequence[torch.Tensor]], *, async_copies: bool = False) -> list[list[torch.Tensor]]:
    """`host_copies` of nested lists (an engine's per-layer weight lists), all in one arena, same nesting."""
    flat = host_copies([t for ts in lists for t in ts], async_copies=async_copies)
    out, i = [], 0
    for ts in lists:
        out.append(flat[i : i + len(ts)])
        i += len(ts)
    return out


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`: from a GPU into page-locked memory (a copy into fresh pageable memory also pays a page
    fault per 4 KiB: 0.23 s for the 0.38 GB of 1080p yuv420p planes vs 0.007 s pinned, H100, 2026-11-26)."""
    if t.device.type != "cuda":
        return t.contiguous()
    return host_copies([t])[0]


__all__ = ["ALIGN", "HostArena", "host_copies", "host_copy_lists", "to_host"]
