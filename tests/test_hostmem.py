"""runtime/hostmem.py: host copies in one registered block (cudaHostAlloc took 14.6 s for the parked 23.5 GB text
encoder on the H100 host and stalled the GPU; allocate + cudaHostRegister took 2.0 s)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fvrt.runtime.hostmem import ALIGN, HostArena, host_copies, host_copy_lists, to_host

TENSORS = [
    torch.randn(3, 5, dtype=torch.bfloat16),
    torch.tensor(7.5),  # 0-dim
    torch.empty(0, 4),  # empty
    torch.randint(0, 255, (17,), dtype=torch.uint8),  # odd byte count: the next view must still be aligned
    torch.randn(2, 3, 4, dtype=torch.float64),
    torch.randint(-5, 5, (9, 2), dtype=torch.int32),
]


def test_copies_are_equal_aligned_and_disjoint() -> None:
    got = host_copies(TENSORS)
    assert [g.shape for g in got] == [t.shape for t in TENSORS]
    for g, t in zip(got, TENSORS, strict=True):
        assert g.dtype == t.dtype and torch.equal(g, t) and g.data_ptr() % ALIGN == 0
    got[0].fill_(1.0)  # a write to one copy leaves the others and the originals untouched
    for g, t in zip(got[1:], TENSORS[1:], strict=True):
        assert torch.equal(g, t)
    assert not torch.equal(TENSORS[0], got[0])


def test_nested_lists_keep_their_nesting_in_one_arena() -> None:
    """An engine's per-layer weight lists (AOTIEngine.offload parks them with this)."""
    lists = [TENSORS[:2], [], TENSORS[2:5], TENSORS[5:]]
    got = host_copy_lists(lists)
    assert [len(g) for g in got] == [len(ts) for ts in lists]
    for gs, ts in zip(got, lists, strict=True):
        assert all(torch.equal(g, t) and g.dtype == t.dtype for g, t in zip(gs, ts, strict=True))
    assert len({id(g._fvrt_arena) for gs in got for g in gs}) == 1


def test_arena_lives_as_long_as_any_tensor_taken_from_it() -> None:
    arena = HostArena(HostArena.size_for([((4, 4), torch.float32), ((8,), torch.int64)]))
    a = arena.take((4, 4), torch.float32)
    b = arena.take((8,), torch.int64)
    with pytest.raises(ValueError, match="full"):
        arena.take((1,), torch.float32)
    ref = weakref.ref(arena)
    del arena
    gc.collect()
    assert ref() is not None  # a and b hold it
    b.copy_(torch.arange(8))
    view = b.numpy()  # what the MP4 encoder thread gets: outlives the arena, as plain memory
    del a
    gc.collect()
    assert ref() is not None
    del b
    gc.collect()
    assert ref() is None and view.tolist() == list(range(8))


def test_cpu_only_machine_gets_pageable_copies() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert not HostArena(64).pinned
    x = torch.arange(6).view(2, 3).t()  # not contiguous
    assert torch.equal(to_host(x), x) and to_host(x).is_contiguous()


@pytest.mark.gpu
def test_gpu_copies_are_page_locked_and_released() -> None:
    x = [torch.randn(1000, 37, device="cuda"), torch.randint(0, 255, (3, 5, 7), dtype=torch.uint8, device="cuda")]
    got = host_copies(x, async_copies=True)
    assert all(g.is_pinned() for g in got) and all(torch.equal(g, t.cpu()) for g, t in zip(got, x, strict=True))
    back = [g.to("cuda", non_blocking=True) for g in got]
    assert all(torch.equal(b, t) for b, t in zip(back, x, strict=True))
    ref = weakref.ref(got[0]._fvrt_arena)
    del got
    gc.collect()
    assert ref() is None  # unregistered (after a device synchronisation) and freed
    planes = to_host(x[1].permute(1, 2, 0))
    assert planes.is_pinned() and torch.equal(planes, x[1].permute(1, 2, 0).cpu())
