"""`fvrt-serve` on the tiny CPU engines: one local Ray cluster for the module, 2 CPU replicas.

Requests at concurrency 4 give the very frames `fvrt-run` gives; a full queue answers 429 and still completes
what it accepted; a replica killed mid-request is replaced, its request retried or failed, never half-served; every
bad input is a 400 with the CLI's message and is never queued; draining finishes what was accepted.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np
import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")
from ray import serve  # noqa: E402

from fvrt.serve.app import APP_NAME, INGRESS, ServeConfig, deploy  # noqa: E402

pytestmark = pytest.mark.slow

REPLICAS = 2
MAX_QUEUED = 4
MAX_BODY = 64 << 10
SEEDS = (10, 11, 12)  # the 12 requests cycle over these; fvrt-run makes each once
TIMEOUT_S = 300.0


class Server(NamedTuple):
    url: str
    results: Path
    engines: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frames_of(mp4: bytes | Path, tmp: Path) -> np.ndarray:
    """The decoded RGB frames of an MP4 (which also checks it is one)."""
    if isinstance(mp4, bytes):
        path = tmp / f"decode-{time.monotonic_ns()}.mp4"
        path.write_bytes(mp4)
        mp4 = path
    with av.open(str(mp4)) as c:
        assert c.streams.video and c.streams.audio, f"{mp4}: no video or no audio stream"
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def server(tiny_engines: Path, module_tmp: Callable[[str], Path]) -> Iterator[Server]:
    results = module_tmp("serve") / "results"
    port = free_port()
    ray.init(num_cpus=REPLICAS, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(str(tiny_engines), replicas=REPLICAS, max_queued=MAX_QUEUED, results=str(results),
                      max_body_bytes=MAX_BODY, drain_timeout_s=TIMEOUT_S)  # fmt: skip
    deploy(cfg)
    try:
        yield Server(f"http://127.0.0.1:{port}/", results, tiny_engines)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_engines: Path, module_tmp: Callable[[str], Path]) -> dict[int, np.ndarray]:
    """`fvrt-run --batch`'s frames for each seed, with the OpenMP threads Ray gives a CPU replica (OMP_NUM_THREADS =
    the actor's CPUs): a CPU engine's parallel reductions split by thread count, and on some CPUs the frames then
    differ in a few pixels (0.1 % of them by up to 13 levels, 2026-12-08) between 1 and 2 threads."""
    root = module_tmp("reference")
    lines = [{"prompt": PROMPT, "seed": s, "output": str(root / f"{s}.mp4")} for s in SEEDS]
    (root / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in lines))
    run = [sys.executable, "-m", "fvrt.runtime.cli", str(tiny_engines), "--batch", str(root / "jobs.jsonl")]
    threads = str(max(1, int(ServeConfig(str(tiny_engines)).replica_cpus)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(run, check=True, capture_output=True, timeout=TIMEOUT_S, env=env)
    return {s: frames_of(root / f"{s}.mp4", root) for s in SEEDS}


PROMPT = "A red fox trots across a snowy field at dawn."


def wait(url: str, video_id: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = requests.get(f"{url}v1/videos/{video_id}", timeout=10).json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.2)
    raise AssertionError(f"{video_id} did not finish in {timeout} s")


def metric(url: str, name: str) -> float:
    """The value of one Prometheus sample line of /metrics (0 when absent)."""
    for line in requests.get(f"{url}metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_readyz_and_healthz_once_warm(server: Server) -> None:
    assert requests.get(f"{server.url}healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["replicas_warm"] == REPLICAS


def test_concurrent_requests_give_fvrt_runs_frames(
    server: Server, reference: dict[int, np.ndarray], tmp_path: Path
) -> None:
    # Precondition: 12 requests over 3 seeds, 4 at a time; half synchronous (MP4 in the answer), half asynchronous
    def one(i: int) -> tuple[int, bytes, dict[str, Any]]:
        body = {"prompt": PROMPT, "seed": SEEDS[i % len(SEEDS)]}
        if i % 2:
            r = requests.post(f"{server.url}v1/videos/sync", json=body, timeout=TIMEOUT_S)
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text[:200]
            video = requests.get(f"{server.url}v1/videos/{r.headers['x-video-id']}", timeout=10).json()
            return i, r.content, video
        r = requests.post(f"{server.url}v1/videos", json=body, timeout=30)
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        video = wait(server.url, r.json()["id"])
        content = requests.get(f"{server.url}v1/videos/{video['id']}/content", timeout=30)
        assert content.status_code == 200, content.text
        return i, content.content, video

    # Under test
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(one, range(12)))

    # Postcondition: every MP4 decodes to fvrt-run's frames for its seed; both replicas served
    pids = set()
    for i, mp4, video in done:
        assert video["status"] == "completed", video
        assert video["progress"] == 100 and video["timings_s"]["pipeline_total"] > 0
        np.testing.assert_array_equal(frames_of(mp4, tmp_path), reference[SEEDS[i % len(SEEDS)]])
        pids.add(video["replica"]["pid"])
    assert len(pids) == REPLICAS
    assert metric(server.url, 'fvrt_requests_total{outcome="completed"}') >= 12
    assert not list(server.results.glob("*.partial")) and not list(server.results.glob(".*.partial"))


def test_range_request_and_delete(server: Server) -> None:
    video = requests.post(f"{server.url}v1/videos", json={"prompt": PROMPT}, timeout=30).json()
    assert wait(server.url, video["id"])["status"] == "completed"
    url = f"{server.url}v1/videos/{video['id']}/content"
    full = requests.get(url, timeout=30).content
    part = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=30)
    assert part.status_code == 206 and part.content == full[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(full)}"
    assert requests.delete(f"{server.url}v1/videos/{video['id']}", timeout=10).json()["deleted"] is True
    assert requests.get(url, timeout=10).status_code == 404
    assert requests.get(f"{server.url}v1/videos/{video['id']}", timeout=10).status_code == 404


def test_full_queue_answers_429_and_completes_what_it_accepted(server: Server) -> None:
    # Precondition: more requests at once than 2 replicas + 4 waiting can hold
    answers = [requests.post(f"{server.url}v1/videos", json={"prompt": PROMPT, "seed": i}, timeout=30)
               for i in range(REPLICAS + MAX_QUEUED + 4)]  # fmt: skip

    # Postcondition: some 429 with Retry-After, and each accepted request completes
    full = [r for r in answers if r.status_code == 429]
    accepted = [r.json()["id"] for r in answers if r.status_code == 202]
    assert full and all(int(r.headers["retry-after"]) >= 1 for r in full)
    assert "queue is full" in full[0].json()["error"]["message"]
    assert MAX_QUEUED <= len(accepted) <= MAX_QUEUED + REPLICAS
    # the last one accepted still waits (4 were ahead of it on 2 replicas): DELETE cancels it, nothing is kept
    cancelled = accepted.pop()
    assert requests.delete(f"{server.url}v1/videos/{cancelled}", timeout=10).json()["deleted"] is True
    assert all(wait(server.url, v)["status"] == "completed" for v in accepted)
    assert requests.get(f"{server.url}v1/videos/{cancelled}", timeout=10).status_code == 404
    assert metric(server.url, 'fvrt_requests_total{outcome="rejected_full"}') >= len(full)


def _png(tmp: Path) -> str:
    from PIL import Image

    path = tmp / "frame.png"
    Image.fromarray(np.full((64, 96, 3), 127, np.uint8)).save(path)
    return base64.b64encode(path.read_bytes()).decode()


BAD = [
    ("resolution", {"prompt": PROMPT, "height": 100}, "--height 100: must be a positive multiple of 64"),
    ("shape", {"prompt": PROMPT, "height": 256}, "the engines were not built for this shape"),
    ("frames", {"prompt": PROMPT, "frames": 10}, "--frames 10: must be 8k+1"),
    ("empty prompt", {"prompt": "  "}, "the prompt is empty"),
    ("no prompt", {"seed": 1}, "'prompt' is required"),
    ("unreadable image", {"prompt": PROMPT, "image": base64.b64encode(b"not an image").decode()}, "--image"),
    ("image not base64", {"prompt": PROMPT, "image": "%%%"}, "'image' is not base64"),
    ("unknown key", {"prompt": PROMPT, "output": "x.mp4"}, "unknown key 'output'"),
    ("wrong type", {"prompt": PROMPT, "seed": "ten"}, "'seed' must be an integer"),
    ("seed range", {"prompt": PROMPT, "seed": 2**70}, "torch.Generator's seed range"),
    ("preset", {"prompt": PROMPT, "preset": "fast"}, "--preset fast: must be one of"),
    ("strength", {"prompt": PROMPT, "image_strength": 2}, "--image-strength 2"),
    ("oversized body", {"prompt": "x" * MAX_BODY}, "the limit is"),
]


@pytest.mark.parametrize(("body", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_are_400_and_never_queued(server: Server, body: dict[str, Any], message: str) -> None:
    before = len(list(server.results.glob("video_*.json")))
    for path in ("v1/videos", "v1/videos/sync"):
        r = requests.post(f"{server.url}{path}", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]
        assert "\n" not in r.json()["error"]["message"]
    assert len(list(server.results.glob("video_*.json"))) == before
    assert metric(server.url, "fvrt_queue_depth") == 0


@pytest.mark.parametrize(("data", "message"), [(b"{not json", "not JSON"), (b"[1, 2]", "expected a JSON object")])
def test_non_json_is_400(server: Server, data: bytes, message: str) -> None:
    r = requests.post(f"{server.url}v1/videos", data=data, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_image_request_completes(server: Server, tmp_path: Path) -> None:
    body = {"prompt": PROMPT, "image": "data:image/png;base64," + _png(tmp_path), "image_strength": 0.8}
    r = requests.post(f"{server.url}v1/videos/sync", json=body, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text[:300]
    assert frames_of(r.content, tmp_path).shape[0] > 1


def test_killed_replica_is_replaced_and_nothing_half_served(
    server: Server, reference: dict[int, np.ndarray], tmp_path: Path
) -> None:
    # Precondition: a request running on a replica
    video = requests.post(f"{server.url}v1/videos", json={"prompt": PROMPT, "seed": SEEDS[0]}, timeout=30).json()
    deadline = time.monotonic() + TIMEOUT_S
    while (state := requests.get(f"{server.url}v1/videos/{video['id']}", timeout=10).json())["replica"] is None:
        assert state["status"] == "queued" and time.monotonic() < deadline, state
        time.sleep(0.02)
    killed = state["replica"]["pid"]

    # Under test: the replica's worker process dies mid-generation
    os.kill(killed, signal.SIGKILL)

    # Postcondition: retried elsewhere (the same frames) or failed with a clear line; never a partial MP4
    final = wait(server.url, video["id"])
    content = requests.get(f"{server.url}v1/videos/{video['id']}/content", timeout=30)
    if final["status"] == "completed":
        assert final["replica"]["pid"] != killed
        np.testing.assert_array_equal(frames_of(content.content, tmp_path), reference[SEEDS[0]])
    else:
        assert "replica making it stopped" in final["error"]["message"], final
        assert content.status_code == 409
    assert not list(server.results.glob("*partial*")) and not list(server.results.glob(".*partial*"))
    # the deployment replaces the replica: ready again, both replicas serve
    deadline = time.monotonic() + TIMEOUT_S
    while requests.get(f"{server.url}readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    after = [requests.post(f"{server.url}v1/videos", json={"prompt": PROMPT}, timeout=30).json() for _ in range(2)]
    assert all(wait(server.url, v["id"])["status"] == "completed" for v in after)


def test_drain_finishes_accepted_requests(server: Server) -> None:
    # Precondition: requests accepted, some still waiting for a replica
    accepted = [requests.post(f"{server.url}v1/videos", json={"prompt": PROMPT, "seed": i}, timeout=30).json()["id"]
                for i in range(REPLICAS + 2)]  # fmt: skip

    # Under test: what fvrt-serve does on SIGINT / SIGTERM before it shuts Serve down
    done = serve.get_deployment_handle(INGRESS, APP_NAME).drain.remote(TIMEOUT_S).result()

    # Postcondition: every accepted request completed; new ones are turned away
    assert done == {"finished": len(accepted), "left": 0}
    assert all(requests.get(f"{server.url}v1/videos/{v}", timeout=10).json()["status"] == "completed" for v in accepted)
    r = requests.post(f"{server.url}v1/videos", json={"prompt": PROMPT}, timeout=30)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
