"""Serving benchmark: what `fvrt-serve` adds per request, and its throughput against `fvrt-run --batch`.

Both run on the same engines, one pipeline each (`--replicas 1`: the one-GPU comparison; more replicas measure
scaling). First `fvrt-run ENGINES --batch` makes `--requests` videos plus one warm-up in one process; its throughput
is requests / the summed wall time of the warm runs. Then a local Ray cluster serves the engines (`fvrt-serve`'s
own deployment), and for each concurrency `--requests` synchronous requests (`POST /v1/videos/sync`, the MP4 in the
answer) are sent that many at a time: throughput = requests / wall time. Per request, the serving overhead is the
client's latency minus the queue wait and the replica's pipeline + MP4 time (HTTP, the ingress's checks, the
handle call, streaming the MP4 back, the atomic store write, the HTTP answer). Writes serve_bench.json to --out.

    python scripts/serve_bench.py --engines engines/tiny --out out/serve-bench            # the CPU tiny default
    python scripts/serve_bench.py --engines engines/1080p --requests 8 --out $OUT         # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROMPT = "A red fox trots across a snowy field at dawn, its breath steaming, birds calling."


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def batch_throughput(engines: Path, n: int, out: Path, threads: int | None) -> dict[str, Any]:
    """`fvrt-run --batch` over n + 1 lines (the first one warms up); videos per second of the warm ones. `threads`:
    its OpenMP threads, those Ray gives a CPU replica (OMP_NUM_THREADS = the actor's CPUs), so that both run the
    same kernels."""
    lines = [{"prompt": PROMPT, "seed": i, "output": str(out / f"batch-{i}.mp4")} for i in range(n + 1)]
    (out / "batch.jsonl").write_text("".join(json.dumps(j) + "\n" for j in lines))
    cmd = [sys.executable, "-m", "fvrt.runtime.cli", str(engines), "--batch", str(out / "batch.jsonl"),
           "--timings", str(out / "batch-timings.json")]  # fmt: skip
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    runs = json.loads((out / "batch-timings.json").read_text())["runs"][1:]
    wall = sum(r["timings_s"]["total"] for r in runs)
    pipeline = [r["timings_s"]["pipeline_total"] + r["timings_s"]["mux"] for r in runs]
    busy = sum(pipeline) / wall  # the share of the wall time spent in the pipeline and the MP4
    return {"videos": n, "seconds": wall, "videos_per_s": n / wall, "pipeline_s_median": statistics.median(pipeline),
            "pipeline_busy": busy}  # fmt: skip


def served_throughput(url: str, n: int, concurrency: int, replicas: int) -> dict[str, Any]:
    import requests

    def one(i: int) -> dict[str, Any]:
        t = time.perf_counter()
        r = requests.post(f"{url}v1/videos/sync", json={"prompt": PROMPT, "seed": i}, timeout=3600)
        latency = time.perf_counter() - t
        r.raise_for_status()
        video = requests.get(f"{url}v1/videos/{r.headers['x-video-id']}", timeout=60).json()
        work = video["timings_s"]["pipeline_total"] + video["timings_s"]["mux"]
        return {"latency_s": latency, "queue_s": video["queue_s"], "work_s": work, "bytes": len(r.content),
                "overhead_s": latency - video["queue_s"] - work}  # fmt: skip

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t
    overhead = sorted(r["overhead_s"] for r in runs)
    return {
        "concurrency": concurrency,
        "videos": n,
        "seconds": wall,
        "videos_per_s": n / wall,
        "overhead_ms_median": 1e3 * statistics.median(overhead),
        "overhead_ms_max": 1e3 * overhead[-1],
        "pipeline_s_median": statistics.median(r["work_s"] for r in runs),
        "latency_s_median": statistics.median(r["latency_s"] for r in runs),
        # the replicas' share of the wall time spent in the pipeline and the MP4: 1 = serving costs them nothing
        "pipeline_busy": sum(r["work_s"] for r in runs) / (wall * replicas),
    }


def direct_throughput(engines: Path, n: int) -> dict[str, Any]:
    """The replica class alone (no Ray, no HTTP): `Replica.generate` n times after its warm-up, as a Serve replica
    runs it (worker thread, MP4 read back into memory); videos per second."""
    from fvrt.serve.replica import Replica
    from fvrt.serve.requests import VideoSpec

    t = time.perf_counter()
    replica = Replica(engines)
    if replica.error:
        raise SystemExit(replica.error)
    start_s = time.perf_counter() - t
    work, t = [], time.perf_counter()
    for i in range(n):
        spec = VideoSpec({"prompt": PROMPT, "seed": i})
        _, timings = replica._worker.submit(replica.generate, spec, lambda *_: None).result()
        work.append(timings["pipeline_total"] + timings["mux"])
    wall = time.perf_counter() - t
    replica.close()
    return {"videos": n, "seconds": wall, "videos_per_s": n / wall, "pipeline_s_median": statistics.median(work),
            "pipeline_busy": sum(work) / wall, "start_s": start_s, "memory_bytes": replica.memory_bytes()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, default=Path("engines/tiny"))
    ap.add_argument("--requests", type=int, default=8, help="videos per measurement")
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--replica-cpus", type=int, default=1, help="Ray CPUs (and OpenMP threads) of a CPU replica")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    ap.add_argument("--out", type=Path, default=Path("out/serve-bench"))
    ap.add_argument("--direct", action="store_true", help="the replica class without Ray or HTTP (a machine "
                    "without ray[serve]): its throughput against --batch")  # fmt: skip
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    threads = None if args.direct else args.replica_cpus  # direct: both in processes of the default threads
    batch = batch_throughput(args.engines, args.requests, args.out, threads)
    if args.direct:
        direct = direct_throughput(args.engines, args.requests)
        after = batch_throughput(args.engines, args.requests, args.out, threads)
        mean = (batch["videos_per_s"] + after["videos_per_s"]) / 2
        share = 100 * direct["videos_per_s"] / mean
        print(f"--batch {batch['videos_per_s']:.4f} / {after['videos_per_s']:.4f} videos/s; replica class "
              f"{direct['videos_per_s']:.4f} videos/s = {share:.1f}% of their mean")  # fmt: skip
        record = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "engines": str(args.engines), "device": _device(),
                  "batch": batch, "batch_after": after, "direct": direct}  # fmt: skip
        (args.out / "serve_bench.json").write_text(json.dumps(record, indent=1) + "\n")
        return
    print(f"fvrt-run --batch: {batch['videos_per_s']:.3f} videos/s ({batch['videos']} in {batch['seconds']:.1f} s; "
          f"pipeline busy {100 * batch['pipeline_busy']:.1f}%)")  # fmt: skip

    import ray
    from ray import serve

    from fvrt.serve.app import ServeConfig, deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    levels = [int(c) for c in args.concurrency.split(",")]
    cfg = ServeConfig(str(args.engines.resolve()), replicas=args.replicas, max_queued=max(levels),
                      results=str((args.out / "results").resolve()), replica_cpus=args.replica_cpus)  # fmt: skip
    deploy(cfg)
    url = f"http://127.0.0.1:{port}/"
    served = []
    try:
        for c in levels:
            r = served_throughput(url, args.requests, c, args.replicas)
            r["vs_batch"] = r["videos_per_s"] / batch["videos_per_s"]  # recomputed below with the second --batch
            served.append(r)
            print(f"fvrt-serve c={c}: {r['videos_per_s']:.3f} videos/s ({100 * r['vs_batch']:.1f}% of --batch; "
                  f"pipeline busy {100 * r['pipeline_busy']:.1f}%), "
                  f"overhead median {r['overhead_ms_median']:.1f} ms, max {r['overhead_ms_max']:.1f} ms")  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
    # --batch again: on a shared machine the load drifts; the served runs are compared with the mean of both
    after = batch_throughput(args.engines, args.requests, args.out, args.replica_cpus)
    mean = (batch["videos_per_s"] + after["videos_per_s"]) / 2
    print(f"fvrt-run --batch again: {after['videos_per_s']:.3f} videos/s; served / mean of both --batch runs: "
          + ", ".join(f"c={r['concurrency']} {100 * r['videos_per_s'] / mean:.1f}%" for r in served))  # fmt: skip
    for r in served:
        r["vs_batch"] = r["videos_per_s"] / mean
    record = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "engines": str(args.engines), "device": _device(),
              "replicas": args.replicas, "replica_cpus": args.replica_cpus}  # fmt: skip
    record.update({"batch": batch, "batch_after": after, "served": served})
    (args.out / "serve_bench.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
