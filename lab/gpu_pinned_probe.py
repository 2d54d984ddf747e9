"""Cold start (issue 6): what parking the text encoder in host memory costs, and what would make it cheaper.

The H100 bench of 2026-11-26 (docs/results/2026-11-26-h100-bench-fp8-ft8-bf16.json) spent 10.2 s (FP8 text
encoder) and 12.6 s (bf16) of the first run in "weight parking":
page-locked host copies of the text encoder made at its first offload, one `torch.empty(pin_memory=True)` per
tensor (torch's caching host allocator rounds each block up to a power of two). This probe times, for tensors of
the bf16 Gemma-3 12B text encoder's shapes (48 layers x 7 linears + the embedding, ~23 GB):
- per-tensor pinned blocks (what the runtime does), one flat pinned block carved into views, a pageable block
  registered with cudaHostRegister, and plain pageable memory: allocation, device-to-host copy, host-to-device copy;
- whether allocating the pinned block in a background thread slows GPU work running meanwhile (could the parking
  overlap with stage 1?).

    python3 lab/gpu_pinned_probe.py --out /tmp/pin
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

HIDDEN, HEAD_Q, HEAD_KV, FFN, LAYERS, VOCAB = 3840, 4096, 2048, 15360, 48, 262_144


def shapes() -> list[tuple[int, int]]:
    layer = [(HEAD_Q, HIDDEN), (HEAD_KV, HIDDEN), (HEAD_KV, HIDDEN), (HIDDEN, HEAD_Q), (FFN, HIDDEN), (FFN, HIDDEN),
             (HIDDEN, FFN)]  # fmt: skip
    return [(VOCAB, HIDDEN)] + layer * LAYERS


def sync_time(fn: Any) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def empty_host_cache() -> None:
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()


def per_tensor(src: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in src]


def flat(src: list[torch.Tensor], pin: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    total = sum(t.numel() * t.element_size() for t in src)
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    views, off = [], 0
    for t in src:
        n = t.numel() * t.element_size()
        views.append(buf[off : off + n].view(t.dtype).view(t.shape))
        off += n
    return buf, views


def copies(src: list[torch.Tensor], host: list[torch.Tensor]) -> tuple[float, float]:
    d2h = sync_time(lambda: [h.copy_(s, non_blocking=True) for h, s in zip(host, src, strict=True)])
    h2d = sync_time(lambda: [s.copy_(h, non_blocking=True) for h, s in zip(host, src, strict=True)])
    return d2h, h2d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    src = [torch.empty(s, dtype=torch.bfloat16, device=dev).normal_() for s in shapes()]
    gb = sum(t.numel() * t.element_size() for t in src) / 1e9
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "GB": gb, "rows": {}}
    print(f"{len(src)} tensors, {gb:.1f} GB", flush=True)

    def row(name: str, alloc_s: float, host: list[torch.Tensor]) -> None:
        d2h, h2d = copies(src, host)
        res["rows"][name] = {"alloc_s": alloc_s, "d2h_s": d2h, "h2d_s": h2d, "park_s": alloc_s + d2h}
        print(name, {k: round(v, 3) for k, v in res["rows"][name].items()}, flush=True)
        (args.out / "pinned.json").write_text(json.dumps(res, indent=1))

    t = time.perf_counter()
    host = per_tensor(src)
    row("per-tensor pinned (runtime today)", time.perf_counter() - t, host)
    del host
    empty_host_cache()

    t = time.perf_counter()
    buf, views = flat(src, pin=True)
    row("one flat pinned block", time.perf_counter() - t, views)
    del buf, views
    empty_host_cache()

    t = time.perf_counter()
    buf, views = flat(src, pin=False)
    alloc = time.perf_counter() - t
    t = time.perf_counter()
    buf.fill_(0)  # fault the pages in (a fresh block's pages are mapped on first touch)
    touch = time.perf_counter() - t
    t = time.perf_counter()
    rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    reg = time.perf_counter() - t
    res["register_rc"], res["register_touch_s"] = int(rc), touch
    row("pageable + touch + cudaHostRegister", alloc + touch + reg, views)
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    row("pageable, touched (no pinning)", alloc + touch, views)
    del buf, views

    from fvrt.runtime.hostmem import host_copies  # what the runtime parks with

    t = time.perf_counter()
    host = host_copies(src, async_copies=True)
    park = time.perf_counter() - t
    res["fvrt_pinned"] = bool(host[0].is_pinned())
    d2h, h2d = copies(src, host)
    res["rows"]["fvrt host_copies (alloc + register + D2H)"] = {"alloc_s": park - d2h, "d2h_s": d2h, "h2d_s": h2d,
                                                                 "park_s": park}  # fmt: skip
    print("fvrt host_copies", res["rows"]["fvrt host_copies (alloc + register + D2H)"], res["fvrt_pinned"], flush=True)
    t = time.perf_counter()
    del host
    res["fvrt_release_s"] = time.perf_counter() - t

    # does a pinned allocation in another thread slow the GPU work of this one?
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def gemms() -> None:
        for _ in range(200):
            a @ a

    alone = sync_time(gemms)
    box: dict[str, Any] = {}

    def allocate() -> None:
        t = time.perf_counter()
        box["buf"] = flat(src, pin=True)
        box["s"] = time.perf_counter() - t

    th = threading.Thread(target=allocate)
    th.start()
    beside = sync_time(gemms)
    th.join()
    res["overlap"] = {"gemms_alone_s": alone, "gemms_beside_alloc_s": beside, "alloc_in_thread_s": box["s"]}
    print("overlap", res["overlap"], flush=True)
    (args.out / "pinned.json").write_text(json.dumps(res, indent=1))

    print(f"\n| {res['gpu']}, {gb:.1f} GB in {len(src)} bf16 tensors | alloc s | D2H s | park s | H2D s |")
    print("|---|---|---|---|---|")
    for name, r in res["rows"].items():
        print(f"| {name} | {r['alloc_s']:.2f} | {r['d2h_s']:.2f} | {r['park_s']:.2f} | {r['h2d_s']:.2f} |")
    o = res["overlap"]
    print(f"200 GEMMs 8192^3 bf16: alone {o['gemms_alone_s']:.3f} s, beside a pinned allocation "
          f"{o['gemms_beside_alloc_s']:.3f} s (allocation in its thread {o['alloc_in_thread_s']:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
