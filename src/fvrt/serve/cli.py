"""`fvrt-serve ENGINE_DIR_OR_BUNDLE`: start (or join, `--address`) a Ray cluster, deploy the app, serve until
SIGINT / SIGTERM, then drain (finish every accepted request) and shut down."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from fvrt.serve.app import APP_NAME, INGRESS, ServeConfig, deploy, read_profiles
from fvrt.serve.requests import DEFAULT_MAX_BODY_BYTES
from fvrt.serve.store import DEFAULT_MAX_AGE_S, DEFAULT_MAX_BYTES

PROG = "fvrt-serve"
EXIT_USAGE = 2
REFUSAL_WAIT_S = 5.0  # after the deployment is up: how long refusing replicas get to report (they do at once)


def _fail(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def readiness(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "readyz", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP address (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--address", default=None, help="Join this Ray cluster (default: start a local one).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
@click.option("--replicas", type=int, default=1, show_default=True, help="Warm pipelines (one per GPU on GPUs).")
@click.option("--min-replicas", type=int, default=None, help="With --max-replicas: autoscale on ongoing requests.")
@click.option("--max-replicas", type=int, default=None)
@click.option("--max-queued", type=int, default=8, show_default=True, help="Accepted requests that may wait; "
              "past them, 429 with Retry-After.")  # fmt: skip
@click.option("--results", type=click.Path(path_type=Path), default=Path("fvrt-results"), show_default=True,
              help="Results store (a local or shared folder).")  # fmt: skip
@click.option("--max-age", type=float, default=DEFAULT_MAX_AGE_S, show_default=True, help="Results expire (s).")
@click.option("--max-store-gb", type=float, default=DEFAULT_MAX_BYTES / 1e9, show_default=True,
              help="The store's size limit; the oldest results go first.")  # fmt: skip
@click.option("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 1e6, show_default=True,
              help="Largest request body (a base64 image included).")  # fmt: skip
@click.option("--device", default=None, help="Replica device (default: the one the engines were built for).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True)
@click.option("--cache", type=click.Path(path_type=Path), default=None, help="Where bundles are unpacked "
              "(default ~/.cache/fvrt/bundles).")  # fmt: skip
@click.option("--drain-timeout", type=float, default=600.0, show_default=True,
              help="On SIGINT/SIGTERM, how long to wait for accepted requests (s).")  # fmt: skip
@click.option("--replica-cpus", type=float, default=1.0, show_default=True, help="Ray CPUs of a CPU replica.")
def main(source: Path, host: str, port: int, address: str | None, num_cpus: int | None, replicas: int,
         min_replicas: int | None, max_replicas: int | None, max_queued: int, results: Path, max_age: float,
         max_store_gb: float, max_body_mb: float, device: str | None, cuda_graphs: bool, cache: Path | None,
         drain_timeout: float, replica_cpus: float) -> None:  # fmt: skip
    """Serve ENGINE_DIR_OR_BUNDLE over HTTP (the /v1/videos API, a web page at /, /healthz, /readyz, /metrics)."""
    try:
        read_profiles(source)
        if (min_replicas is None) != (max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together")
        if min_replicas is not None and not 0 < min_replicas <= max_replicas:
            raise ValueError(f"--min-replicas {min_replicas} --max-replicas {max_replicas}: need 0 < min <= max")
        for flag, value in (("--replicas", replicas), ("--max-queued", max_queued + 1)):
            if value < 1:
                raise ValueError(f"{flag} {value}: must be positive")
        results.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        _fail((getattr(e, "strerror", None) and f"--results {results}: {e.strerror}") or str(e))
    cfg = ServeConfig(
        source=str(source.resolve()), replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
        max_queued=max_queued, results=str(results.resolve()), max_age_s=max_age,
        max_store_bytes=int(max_store_gb * 1e9), max_body_bytes=int(max_body_mb * 1e6), device=device,
        cuda_graphs=cuda_graphs, drain_timeout_s=drain_timeout, replica_cpus=replica_cpus,
        **({"cache": str(cache)} if cache else {}),
    )  # fmt: skip
    import ray
    from ray import serve

    ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t = time.perf_counter()
    deploy(cfg)
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/"
    state = readiness(url)
    deadline = time.monotonic() + REFUSAL_WAIT_S
    while not state["ready"] and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.5)
        state = readiness(url)
    for line in state["problems"]:
        click.echo(f"{PROG}: {line}", err=True)
    warm = state["replicas_warm"]
    click.echo(f"{PROG}: serving {source} at {url} ({warm} replica{'s' if warm != 1 else ''} warm in "
               f"{time.perf_counter() - t:.1f} s; results in {cfg.results}); Ctrl-C drains and stops")  # fmt: skip
    while not stop.wait(1.0):
        pass
    click.echo(f"{PROG}: draining (finishing accepted requests, at most {drain_timeout:g} s)", err=True)
    done = serve.get_deployment_handle(INGRESS, APP_NAME).drain.remote(drain_timeout).result()
    click.echo(f"{PROG}: {done['finished']} requests finished, {done['left']} left; shutting down", err=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
