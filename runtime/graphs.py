"""CUDA-graph replay of static-shape engine calls.

`GraphRunner(key, fn, *inputs)` runs `fn(*inputs) -> tuple[Tensor, ...]`. On a CUDA device the first call for a
key copies the inputs into static buffers, warms `fn` up on a side stream, captures it into a CUDA graph (all
graphs share one memory pool, which is safe because the pipeline replays them in capture order, one at a time)
and then replays; every later call copies the new inputs into the static buffers and replays. Even the capturing
call replays, so the first and the later results come from the same kernels. No call synchronises the host with
the device. Elsewhere (CPU) `fn` simply runs eagerly.

A key whose capture fails (an op that synchronises with the host or is otherwise not capturable) is logged,
recorded in `failures`, and runs eagerly from then on: slower, never wrong.

The key must name everything the captured work depends on besides the input tensors: the engine, its shape
key and any Python-level flag. Input shapes and dtypes are added to the key here. Outputs are the graph's own
static tensors, overwritten by the next replay of the same key: consume (or clone) them before that.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

WARMUP_CALLS = 1  # side-stream warm-up run before capture (lazy initialisation, cuBLAS workspaces)

_CAPTURE_ERRORS = (RuntimeError, getattr(torch, "AcceleratorError", RuntimeError))

EngineFn = Callable[..., tuple[torch.Tensor, ...]]


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class GraphRunner:
    """Captures each (key, input signature) once and replays it; eager when disabled or off CUDA."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self._graphs: dict[Hashable, _Graph] = {}
        self._eager: set[Hashable] = set()  # keys whose capture failed: they run eagerly from then on
        self.failures: dict[str, str] = {}  # key -> why its capture failed (reported by the timings)
        self.capture_seconds = 0.0  # wall time of every capture (warm-up calls included), summed
        # A MemPool object holds its own reference to the pool: it outlives the graphs captured into it. With a bare
        # `graph_pool_handle()` the pool went away with the last graph (the text encoder's, dropped when it is
        # parked), and every later capture into that handle failed in the allocator (torch 2.11, H100:
        # "it->second->use_count > 0 INTERNAL ASSERT FAILED").
        self._mempool = torch.cuda.MemPool() if self.enabled else None
        self._old_pools: list[torch.cuda.MemPool] = []  # pools left behind by failed captures (see _capture)

    def __call__(self, key: Hashable, fn: EngineFn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            return fn(*inputs)
        full_key = (key, tuple((tuple(t.shape), t.dtype) for t in inputs))
        if full_key in self._eager:
            return fn(*inputs)
        entry = self._graphs.get(full_key)
        if entry is None:
            t = time.perf_counter()
            try:
                entry = self._capture(fn, inputs)
            except _CAPTURE_ERRORS as e:  # e.g. an op that synchronises with the host: run this key eagerly
                torch.cuda.synchronize(self.device)
                self.capture_seconds += time.perf_counter() - t
                self._eager.add(full_key)
                self.failures[repr(key)] = " ".join(str(e).split())[:300]
                logger.warning("CUDA-graph capture of %s failed, running it without a graph: %s", key, e)
                return fn(*inputs)
            torch.cuda.synchronize(self.device)  # the warm-up calls' work belongs to the capture's time
            self.capture_seconds += time.perf_counter() - t
            self._graphs[full_key] = entry
        for static, new in zip(entry.inputs, inputs, strict=True):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new, non_blocking=True)
        entry.graph.replay()
        return entry.outputs

    def _capture(self, fn: EngineFn, inputs: tuple[torch.Tensor, ...]) -> _Graph:
        static = tuple(t.detach().clone() for t in inputs)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_CALLS):
                fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(graph, pool=self._mempool.id)
        try:
            with torch.no_grad(), capture:
                outputs = tuple(fn(*static))
        except BaseException:
            self._after_failed_capture(capture)
            raise
        return _Graph(graph, static, outputs)

    def _after_failed_capture(self, capture: torch.cuda.graph) -> None:
        """A capture that fails inside the block makes `capture_end` raise before it restores the stream and
        ends the allocator's recording into the pool; every later capture then failed with "beginAllocateToPool:
        already recording to mempool_id" (H100, torch 2.11). Restore the stream, end the recording, and capture
        into a fresh pool from now on (the old one is kept: graphs already captured still use it)."""
        with contextlib.suppress(RuntimeError, AttributeError):
            capture.stream_ctx.__exit__(None, None, None)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        with contextlib.suppress(RuntimeError):  # "not currently recording": the capture had ended cleanly
            torch._C._cuda_endAllocateToPool(index, self._mempool.id)
        self._old_pools.append(self._mempool)
        self._mempool = torch.cuda.MemPool()

    def clear(self) -> None:
        """Drop every captured graph (their static buffers and pool memory go with them)."""
        self._graphs.clear()

    def drop(self, names: set[str]) -> None:
        """Drop the graphs whose key starts with one of `names` (keys are (name, shape key, ...) tuples), e.g.
        before the engines they call are released: a graph replays raw device addresses."""
        for k in [k for k in self._graphs if isinstance(k[0], tuple) and k[0] and k[0][0] in names]:
            del self._graphs[k]
