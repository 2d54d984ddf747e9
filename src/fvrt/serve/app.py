"""The Ray Serve application: a FastAPI ingress (`VideoAPI`) in front of warm pipeline replicas (`VideoReplica`).

The ingress checks each request with the CLI's checks (a 400, never queued), admits it while fewer than
`max_queued` accepted requests wait for a replica (else a 429 with Retry-After: memory does not grow with the
queue), and streams it to a replica, which makes one video at a time (`max_ongoing_requests=1`) and streams back
its progress, then the MP4. The MP4 goes into the results store atomically, its record after it. A request whose
replica dies is sent once more to another replica (the same seed gives the same video), then reported failed.
`drain()` stops admitting and waits for every accepted request: fvrt-serve calls it before shutting down.
"""

import asyncio
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from fvrt.runtime.bundle import DEFAULT_CACHE, read_bundle_manifest
from fvrt.runtime.manifest import read_manifest
from fvrt.runtime.pipeline import STAGE_TIMINGS
from fvrt.serve.replica import Replica
from fvrt.serve.requests import DEFAULT_MAX_BODY_BYTES, BadRequest, VideoSpec, check_body
from fvrt.serve.store import DEFAULT_MAX_AGE_S, DEFAULT_MAX_BYTES, ID_PATTERN, ResultStore

logger = logging.getLogger("ray.serve")
APP_NAME = "fvrt"
INGRESS, REPLICA = "VideoAPI", "VideoReplica"
STATIC = Path(__file__).parent / "static"
ATTEMPTS = 2  # a request whose replica dies is sent to another replica once
SWEEP_EVERY_S = 10.0
ESTIMATE_S = 30.0  # Retry-After before any video has been made (then: the mean of the last ones)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)


@dataclass
class ServeConfig:
    """What `fvrt-serve` deploys; every field has its command-line option."""

    source: str  # engine directory or bundle
    replicas: int = 1
    min_replicas: int | None = None  # both set: autoscaling on ongoing requests instead of `replicas`
    max_replicas: int | None = None
    max_queued: int = 8
    results: str = "fvrt-results"
    max_age_s: float = DEFAULT_MAX_AGE_S
    max_store_bytes: int = DEFAULT_MAX_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    device: str | None = None  # default: the engines' (manifest build.device)
    cuda_graphs: bool = True
    cache: str = str(DEFAULT_CACHE)
    drain_timeout_s: float = 600.0
    replica_cpus: float = 1.0  # Ray CPUs of a CPU replica (a GPU replica takes one GPU)


def read_profiles(source: str | Path) -> tuple[dict[str, dict[str, Any]], str]:
    """The engines' profiles and device kind, from the directory's or the bundle's manifest (no unpacking)."""
    path = Path(source)
    manifest = read_bundle_manifest(path)[0] if path.is_file() else read_manifest(path)
    return manifest.profiles, manifest.build.device


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series: they only say when the ingress started
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fvrt_requests", "Requests by outcome", ["outcome"], registry=r)
        self.queued = Gauge("fvrt_queue_depth", "Accepted requests waiting for a replica", registry=r)
        self.running = Gauge("fvrt_requests_running", "Requests a replica is making", registry=r)
        self.stage = Histogram("fvrt_stage_seconds", "Pipeline stage latency", ["stage"], buckets=LATENCY_BUCKETS,
                               registry=r)  # fmt: skip
        self.latency = Histogram("fvrt_request_seconds", "Accepted -> MP4 stored", buckets=LATENCY_BUCKETS, registry=r)
        self.wait = Histogram("fvrt_queue_wait_seconds", "Accepted -> started", buckets=LATENCY_BUCKETS, registry=r)
        what = "Request latency minus the pipeline's and the queue's"
        fine = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
        self.overhead = Histogram("fvrt_serving_overhead_seconds", what, buckets=fine, registry=r)
        self.memory = Gauge("fvrt_replica_gpu_memory_bytes", "GPU memory reserved per replica", ["replica"], registry=r)
        self.refused = Gauge("fvrt_replicas_refused", "Replicas that refused their engines", registry=r)


@dataclass
class Video:
    """An accepted request while the ingress holds it (then its record is in the store)."""

    id: str
    spec: VideoSpec
    created_at: float = field(default_factory=time.time)
    status: str = "queued"  # -> in_progress -> completed | failed
    stage: str | None = None
    progress: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    replica: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    deleted: bool = False  # cancelled by DELETE while waiting: no record is kept
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, max_age_s: float) -> dict[str, Any]:
        """The video object (OpenAI videos API fields, plus fvrt's stage, request and timings)."""
        f = self.spec.fields
        return {
            "id": self.id,
            "object": "video",
            "status": self.status,
            "created_at": int(self.created_at),
            "completed_at": int(self.completed_at) if self.completed_at else None,
            "expires_at": int(self.completed_at + max_age_s) if self.completed_at else None,
            "progress": self.progress,
            "stage": self.stage,
            "model": "fvrt",
            "seconds": f"{f['frames'] / f['fps']:.2f}",
            "size": f"{f['width']}x{f['height']}",
            "request": f | {"image": self.spec.image is not None},
            "error": {"message": self.error} if self.error else None,
            "replica": self.replica,
            "timings_s": self.timings_s or None,
            # accepted -> started on a replica, accepted -> stored (seconds; once finished)
            "queue_s": (self.started_at or self.completed_at) - self.created_at if self.completed_at else None,
            "total_s": self.completed_at - self.created_at if self.completed_at else None,
        }


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status, headers=headers)


web = FastAPI(title="fvrt", docs_url="/docs", redoc_url=None)


@serve.deployment(name=INGRESS, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(web)
class VideoAPI:
    def __init__(self, replicas: Any, config: dict[str, Any]) -> None:
        self.cfg = ServeConfig(**config)
        self.replicas = replicas
        self.profiles, _ = read_profiles(self.cfg.source)
        self.store = ResultStore(self.cfg.results, max_age_s=self.cfg.max_age_s, max_bytes=self.cfg.max_store_bytes)
        self.metrics = Metrics()
        self.videos: dict[str, Video] = {}
        self.metrics.queued.set_function(lambda: sum(v.status == "queued" for v in self.videos.values()))
        self.metrics.running.set_function(lambda: sum(v.status == "in_progress" for v in self.videos.values()))
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.refusals: dict[str, str] = {}  # replica pid -> its one-line refusal
        self.recent: list[float] = []  # the last generations' seconds, for Retry-After
        self.last_sweep = 0.0

    # ---- admission ------------------------------------------------------------------------------------------

    def _slots(self) -> int:
        return self.cfg.max_replicas or self.cfg.replicas

    def _retry_after(self, waiting: int) -> int:
        each = sum(self.recent) / len(self.recent) if self.recent else ESTIMATE_S
        return max(1, math.ceil(each * (waiting + 1) / self._slots()))

    async def _admit(self, request: Request) -> Video | Response:
        """The accepted Video, or the response refusing it (400 bad request, 429 queue full, 503 draining)."""
        if self.draining:
            self.metrics.requests.labels("rejected_draining").inc()
            return error(503, "the server is shutting down", {"Retry-After": "30"})
        try:
            body = await self._body(request)
            video_id = f"video_{uuid.uuid4().hex}"
            # off the event loop: decoding an uploaded image takes milliseconds (tens at 1080p)
            spec = await asyncio.to_thread(check_body, body, self.profiles, self.store.scratch, video_id)
        except BadRequest as e:
            self.metrics.requests.labels("rejected_invalid").inc()
            logger.info("fvrt request rejected (400): %s", e)
            return error(400, str(e))
        waiting = sum(v.status == "queued" for v in self.videos.values())
        if waiting >= self.cfg.max_queued:
            self.metrics.requests.labels("rejected_full").inc()
            retry = self._retry_after(waiting)
            return error(429, f"the queue is full ({waiting} waiting); retry in {retry} s", {"Retry-After": str(retry)})
        video = Video(video_id, spec)
        self.videos[video_id] = video
        task = asyncio.create_task(self._run(video), name=video_id)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return video

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"request: the body is {int(declared)} bytes, the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request: the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # ---- running --------------------------------------------------------------------------------------------

    async def _run(self, video: Video) -> None:
        try:
            await self._attempts(video)
        except asyncio.CancelledError:  # DELETE of a waiting request
            video.status, video.error = "failed", "cancelled"
        except Exception as e:
            logger.exception("fvrt video=%s: unexpected error", video.id)
            video.status, video.error = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
        finally:
            if video.status not in ("completed", "failed"):
                video.status = "failed"
            self._finish(video)

    async def _attempts(self, video: Video) -> None:
        """Stream the request to a replica; once more to another if that one dies or refused its engines."""
        for attempt in range(1, ATTEMPTS + 1):
            video.attempts = attempt
            try:
                stream = self.replicas.options(stream=True).run.remote(video.spec)
                async for event in stream:
                    if event["event"] == "done":  # the MP4 into the store before the status says completed
                        await asyncio.to_thread(self.store.put_mp4, video.id, event["mp4"])
                    self._event(video, event)
                if video.status != "refused":
                    return
                lost = video.error or "engines refused"
            except (RayActorError, RequestCancelledError) as e:
                if video.status in ("completed", "failed"):
                    return
                lost = f"the replica making it stopped ({type(e).__name__})"
            except BackPressureError:
                lost = "no replica could take it"
            video.status, video.stage, video.progress = "queued", None, 0
            logger.warning("fvrt video=%s attempt %d: %s", video.id, attempt, lost)
            if attempt == ATTEMPTS:
                video.status, video.error = "failed", f"{lost}; tried {ATTEMPTS} times"

    def _event(self, video: Video, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "started":
            # the replica's clock (the event may reach the ingress late, with the first progress events)
            video.status, video.started_at, video.stage = "in_progress", float(event["at"]), "starting"
            video.replica = {"pid": event["pid"], "device": event["device"]}
        elif kind == "progress":
            video.stage, video.progress = event["stage"], max(video.progress, int(event["progress"]))
        elif kind == "failed" and str(event["error"]).startswith("engines refused"):
            self.refused(video.replica["pid"] if video.replica else 0, event["error"])
            video.status, video.error = "refused", event["error"]  # tried on another replica
        elif kind == "failed":
            video.status, video.error = "failed", event["error"]
        elif kind == "done":
            video.status, video.progress, video.stage = "completed", 100, None
            video.timings_s = event["timings_s"]
            if event.get("memory_bytes") is not None and video.replica:
                self.metrics.memory.labels(str(video.replica["pid"])).set(event["memory_bytes"])

    def _finish(self, video: Video) -> None:
        video.completed_at = time.time()
        if not video.deleted:
            self.store.put_record(video.id, video.record(self.cfg.max_age_s))
        del self.videos[video.id]
        m, t = self.metrics, video.timings_s
        m.requests.labels(video.status).inc()
        total = video.completed_at - video.created_at
        wait = (video.started_at or video.completed_at) - video.created_at
        if video.status == "completed":
            m.latency.observe(total)
            m.wait.observe(wait)
            m.overhead.observe(max(0.0, total - wait - t.get("pipeline_total", 0.0) - t.get("mux", 0.0)))
            for stage in (*STAGE_TIMINGS, "mux"):
                if stage in t:
                    m.stage.labels(stage).observe(t[stage])
            self.recent = [*self.recent[-9:], (video.completed_at - (video.started_at or video.created_at))]
        stages = " ".join(f"{k}={t[k]:.3f}" for k in (*STAGE_TIMINGS, "mux") if k in t)
        pid = video.replica["pid"] if video.replica else None
        logger.info(
            "fvrt video=%s status=%s total_s=%.3f queue_s=%.3f attempts=%d replica_pid=%s %s%s",
            video.id, video.status, total, wait, video.attempts, pid, stages,
            f" error={video.error!r}" if video.error else "",
        )  # fmt: skip
        video.done.set()
        self._sweep(force=True)

    def _sweep(self, force: bool = False) -> None:
        """Expire results (by age, then by the store's size): after each video, and at most every SWEEP_EVERY_S
        when asked for one (so that an idle server expires them too)."""
        now = time.time()
        if force or now - self.last_sweep > SWEEP_EVERY_S:
            self.last_sweep = now
            gone = self.store.sweep(now)
            if gone:
                logger.info("fvrt results expired: %d (%s ...)", len(gone), gone[0])

    # ---- API ------------------------------------------------------------------------------------------------

    def _lookup(self, video_id: str) -> dict[str, Any] | None:
        self._sweep()
        if video_id in self.videos:
            return self.videos[video_id].record(self.cfg.max_age_s)
        return self.store.get_record(video_id) if ID_PATTERN.match(video_id) else None

    @web.post("/v1/videos", status_code=202)
    async def create(self, request: Request) -> Response:
        """Queue a video: 202 and its video object."""
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        return JSONResponse(admitted.record(self.cfg.max_age_s), status_code=202)

    @web.post("/v1/videos/sync")
    async def create_sync(self, request: Request) -> Response:
        """Make a video and answer with the MP4 (the video's id in the X-Video-Id header)."""
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        await admitted.done.wait()
        if admitted.status != "completed":
            return error(500, admitted.error or "failed", {"X-Video-Id": admitted.id})
        return FileResponse(self.store.mp4(admitted.id), media_type="video/mp4", headers={"X-Video-Id": admitted.id})

    @web.get("/v1/videos/{video_id}")
    async def retrieve(self, video_id: str) -> Response:
        record = self._lookup(video_id)
        return JSONResponse(record) if record else error(404, f"no video {video_id}")

    @web.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str) -> Response:
        """The MP4 (HTTP range requests supported: players seek)."""
        record = self._lookup(video_id)
        if record is None:
            return error(404, f"no video {video_id}")
        if record["status"] != "completed":
            return error(409, f"video {video_id} is {record['status']}, it has no content")
        path = self.store.mp4(video_id)
        if not path.is_file():
            return error(404, f"video {video_id} has expired")
        return FileResponse(path, media_type="video/mp4")

    @web.delete("/v1/videos/{video_id}")
    async def delete(self, video_id: str) -> Response:
        """Delete a finished video, or cancel one that is still waiting for a replica."""
        live = self.videos.get(video_id)
        if live is not None and live.status == "in_progress":
            return error(409, f"video {video_id} is in_progress; delete it once it has finished")
        if live is not None:
            live.deleted = True
            for task in list(self.tasks):
                if task.get_name() == video_id:
                    task.cancel()
        found = self.store.delete(video_id) if ID_PATTERN.match(video_id) else False
        if live is None and not found:
            return error(404, f"no video {video_id}")
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    def refused(self, pid: int, line: str) -> None:
        """A replica's one-line refusal of its engines (it stays up, without engines): /readyz reports it."""
        self.refusals[str(pid)] = line
        self.metrics.refused.set(len(self.refusals))
        logger.error("fvrt replica pid=%d %s", pid, line)

    @web.get("/healthz")
    async def healthz(self) -> Response:
        return JSONResponse({"status": "ok"})

    @web.get("/readyz")
    async def readyz(self) -> Response:
        """200 when every replica the deployment wants is up and warm and none refused its engines."""
        problems = list(dict.fromkeys(self.refusals.values()))
        app = serve.status().applications.get(serve.get_replica_context().app_name)
        dep = app.deployments.get(REPLICA) if app else None
        states = {str(k): v for k, v in (dep.replica_states if dep else {}).items()}
        running = sum(v for k, v in states.items() if k.endswith("RUNNING"))
        if dep is None or str(dep.status).split(".")[-1] != "HEALTHY":
            problems.append(f"replicas: {running} warm, deployment {str(dep.status) if dep else 'missing'}")
        if self.draining:
            problems.append("draining")
        warm = max(0, running - len(self.refusals))  # a replica that refused its engines runs, without them
        body = {"ready": not problems, "replicas_warm": warm, "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @web.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @web.get("/")
    async def page(self) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # ---- shutdown -------------------------------------------------------------------------------------------

    async def drain(self, timeout_s: float | None = None) -> dict[str, int]:
        """Stop admitting (503) and wait for every accepted request to finish; returns how many finished and how
        many were still running at the timeout."""
        self.draining = True
        pending = list(self.tasks)
        if pending:
            await asyncio.wait(pending, timeout=timeout_s if timeout_s is not None else self.cfg.drain_timeout_s)
        left = sum(not t.done() for t in pending)
        logger.info("fvrt drained: %d requests finished, %d left", len(pending) - left, left)
        return {"finished": len(pending) - left, "left": left}

    async def __del__(self) -> None:  # Serve calls it on shutdown, after drain() when fvrt-serve shuts down
        await self.drain()


@serve.deployment(name=REPLICA, max_ongoing_requests=1, health_check_period_s=10, health_check_timeout_s=60)
class VideoReplica:
    """One warm pipeline (`Replica`); Serve routes it one request at a time."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServeConfig(**config)
        self.core = Replica(cfg.source, device=cfg.device, cuda_graphs=cfg.cuda_graphs, cache=cfg.cache)
        if self.core.error is not None:  # said to the ingress (its /readyz), off the constructor's thread
            app = serve.get_replica_context().app_name
            ingress = serve.get_deployment_handle(INGRESS, app)
            pid, line = os.getpid(), self.core.error
            threading.Thread(target=lambda: ingress.refused.remote(pid, line).result(), daemon=True).start()

    async def run(self, spec: VideoSpec) -> Any:
        async for event in self.core.run(spec):
            yield event

    def status(self) -> dict[str, Any]:
        return self.core.status()


def build(cfg: ServeConfig) -> Any:
    """The bound application: the ingress over the replica deployment, sized and placed by `cfg`."""
    _, device = read_profiles(cfg.source)
    device = cfg.device or device
    gpu = device.startswith("cuda")
    actor = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cfg.replica_cpus}
    opts: dict[str, Any] = {"ray_actor_options": actor, "max_queued_requests": cfg.max_queued + cfg.replicas}
    if cfg.min_replicas is not None and cfg.max_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": 1}  # fmt: skip
        opts["max_queued_requests"] = cfg.max_queued + cfg.max_replicas
    else:
        opts["num_replicas"] = cfg.replicas
    grace = {"graceful_shutdown_timeout_s": cfg.drain_timeout_s}
    replicas = VideoReplica.options(**opts, **grace).bind(vars(cfg))
    return VideoAPI.options(**grace).bind(replicas, vars(cfg))


def deploy(cfg: ServeConfig, *, blocking: bool = False) -> Any:
    """Deploy on the connected Ray cluster (`ray.init` first; `serve.start` for the HTTP options)."""
    return serve.run(build(cfg), name=APP_NAME, route_prefix="/", blocking=blocking)


__all__ = ["APP_NAME", "Replica", "ServeConfig", "VideoAPI", "VideoReplica", "build", "deploy"]
