"""Start N ranks of one job on this host and end them together: the process side of sequence parallelism.

`run_ranks(fn, world_size, args)` spawns one process per rank, joins them into one `torch.distributed` process
group over a TCP store on 127.0.0.1 (gloo on the CPU, NCCL on GPUs), calls `fn(rank, world_size, *args)` in each
and returns the ranks' results in rank order. Failure is all-or-nothing:

- every collective has a timeout (`init_process_group(timeout=...)`), so a rank waiting on a peer that hangs
  raises instead of waiting forever;
- a rank that raises ends its process; its peers' collectives then fail (gloo: the connection closes, or the
  timeout) and they end with their own error;
- the parent waits for the others up to the collective timeout plus a grace period, kills any still alive, and
  raises `RankError` with one line naming the first failed rank and its error.

Every rank process sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 before
the process group starts: NVLink multicast stays off on the multi-GPU hosts (`NVLINK_MULTICAST_OFF`).

Results travel back through `torch.save` files (tensors, lists, dicts, numbers, strings), not through pipes:
a rank's output is complete on disk before its process ends.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

NVLINK_MULTICAST_OFF: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""Set in every rank process: NVLink SHARP / multicast objects stay unused (the lent multi-GPU hosts must not
create them)."""

LOCALHOST = "127.0.0.1"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
"""A collective that waits longer than this raises on every rank still in it (engine loading and CUDA-graph
capture happen outside collectives)."""
KILL_GRACE_S = 10.0
"""After the first failure, how long past the collective timeout the parent waits for the other ranks to end
by themselves before it kills them."""


class RankError(RuntimeError):
    """One rank failed. The message is one line: which rank failed first, and its error. `statuses` holds one
    line per rank: "ok", its own error, or "killed" (still running after the grace period)."""

    def __init__(self, message: str, statuses: list[str]) -> None:
        super().__init__(message)
        self.statuses = statuses


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def init_rank(rank: int, world_size: int, port: int, *, backend: str, timeout_s: float) -> None:
    """Join the process group of a job on this host (TCP store on 127.0.0.1:`port`), collective timeout set."""
    os.environ.update(NVLINK_MULTICAST_OFF)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{LOCALHOST}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    args: tuple[Any, ...],
    out: str,
) -> None:
    """Body of one rank process: result -> `out`, or the error line -> `out + '.err'` and exit code 1."""
    try:
        init_rank(rank, world_size, port, backend=backend, timeout_s=timeout_s)
        result = fn(rank, world_size, *args)
        torch.save(result, out + ".tmp")
        os.replace(out + ".tmp", out)
    except BaseException as exc:  # every failure of this rank, reported to the parent as one line
        failed_ns = time.time_ns()
        logger.debug("rank %d failed", rank, exc_info=True)
        Path(out + ".err").write_text(f"{failed_ns}\t{_one_line(exc)}\n")
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    kill_grace_s: float = KILL_GRACE_S,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes (spawned: `fn` and `args` must be
    picklable, `fn` a module-level function) joined in one process group; return the results in rank order.

    Raises RankError (one line: the first rank that failed and its error) if any rank raises, exits or is
    killed; by then every rank process has ended: the others end by themselves (their collectives fail) or
    are killed `timeout_s + kill_grace_s` seconds after the first failure."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fvrt-ranks-") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, r, world_size, port, backend, timeout_s, args, outs[r]),
                name=f"fvrt-rank{r}",
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        ended_ns, killed = _wait(procs, timeout_s + kill_grace_s)
        reports = [_report(o) for o in outs]
        statuses = [_status(r, reports[r], procs[r], killed) for r in range(world_size)]
        # The cause of a failed job: a rank that died without a report of its own (a signal, a crash; not one
        # killed here), since ranks that lose a peer report the broken collective; else the earliest report (a
        # rank's peers fail after it: their collectives break when it ends).
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0 and r not in killed]
        silent = [(ended_ns[r], r) for r in failed if reports[r] is None]
        reported = [(reports[r][0], r) for r in failed if reports[r] is not None]
        failures = silent or reported or [(ended_ns[r], r) for r in killed]
        if failures:
            first = min(failures)[1]
            raise RankError(f"rank {first} of {world_size} failed: {statuses[first]}", statuses)
        return [torch.load(o, weights_only=True) for o in outs]


def _wait(procs: list[Any], grace_s: float) -> tuple[list[int], set[int]]:
    """Wait until all processes end; after the first one that fails, wait at most `grace_s` for the rest and
    kill what is left. Returns (per rank, the wall-clock ns at which its end was seen; the ranks killed)."""
    ended_ns = [0] * len(procs)
    killed: set[int] = set()
    deadline = float("inf")
    while alive := [r for r, p in enumerate(procs) if not ended_ns[r]]:
        timeout = None if deadline == float("inf") else max(deadline - time.monotonic(), 0.0)
        mp.connection.wait([procs[r].sentinel for r in alive], timeout)  # wakes as soon as a process ends
        now = time.time_ns()
        for r in alive:
            if not procs[r].is_alive():
                ended_ns[r] = now
                if procs[r].exitcode != 0 and deadline == float("inf"):
                    deadline = time.monotonic() + grace_s
        if time.monotonic() >= deadline:
            for r in alive:
                if procs[r].is_alive():
                    logger.warning("rank %d still running %.0f s after a rank failed: killing it", r, grace_s)
                    procs[r].kill()
                    killed.add(r)
                    procs[r].join()
                    ended_ns[r] = time.time_ns()
    for p in procs:
        p.join()
    return ended_ns, killed


def _report(out: str) -> tuple[int, str] | None:
    """(failure time in ns, error line) that a rank wrote, or None."""
    err = Path(out + ".err")
    if not err.exists():
        return None
    stamp, line = err.read_text().strip().split("\t", 1)
    return int(stamp), line


def _status(rank: int, report: tuple[int, str] | None, proc: Any, killed: set[int]) -> str:
    """One line for how a rank ended: "ok", the error it reported, "killed", or its exit code / signal."""
    if report is not None:
        return report[1]
    if rank in killed:
        return "killed"
    code = proc.exitcode
    if code == 0:
        return "ok"
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
