"""`fvrt-serve` as an operator runs it: a bundle packed by `fvrt-pack`, served by the command (its own local Ray
cluster, one CPU replica), the web page driven in headless Chromium, SIGTERM draining accepted requests; and a
bundle built for another torch refused with one line by the replica and the server, without a crash loop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray")

from fvrt.runtime.bundle import pack  # noqa: E402
from fvrt.serve.replica import Replica  # noqa: E402
from fvrt.serve.requests import VideoSpec  # noqa: E402

pytestmark = pytest.mark.slow
TIMEOUT_S = 300.0
PROMPT = "A lighthouse on a cliff at night, waves crashing."


class Served(NamedTuple):
    proc: subprocess.Popen[str]
    url: str
    results: Path
    cache: Path
    log: Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tiny_engines: Path, module_tmp: Callable[[str], Path]) -> Path:
    out = module_tmp("bundle") / "tiny.tar"
    done = subprocess.run([sys.executable, "-m", "fvrt.runtime.bundle", str(tiny_engines), str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def served(bundle: Path, module_tmp: Callable[[str], Path]) -> Iterator[Served]:
    root = module_tmp("served")
    port = _free_port()
    log = root / "fvrt-serve.log"
    cmd = [sys.executable, "-m", "fvrt.serve.cli", str(bundle), "--port", str(port), "--num-cpus", "1",
           "--replicas", "1", "--results", str(root / "results"), "--cache", str(root / "cache")]  # fmt: skip
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while "fvrt-serve: serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield Served(proc, f"http://127.0.0.1:{port}/", root / "results", root / "cache", log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serves_the_bundle_unpacked_once(served: Served) -> None:
    assert f"at {served.url} (1 replica warm" in served.log.read_text()
    (unpacked,) = [p for p in served.cache.iterdir() if not p.name.startswith(".")]
    assert (unpacked / "manifest.json").is_file()
    assert requests.get(f"{served.url}readyz", timeout=10).status_code == 200


def _chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (`make browser`)")
    return browser, driver


def test_web_page_plays_the_video_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(arg)
    page = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        # Precondition: the page, a prompt
        page.get(served.url)
        prompt = page.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPT)
        page.find_element(By.ID, "seed").clear()
        page.find_element(By.ID, "seed").send_keys("7")

        # Under test: submit, wait for the player to have the video's metadata
        page.find_element(By.ID, "submit").click()
        duration = "const v = document.getElementById('player'); return v.hidden ? 0 : (v.duration || 0);"
        WebDriverWait(page, TIMEOUT_S, poll_frequency=0.5).until(
            lambda p: p.execute_script(duration) > 0 or p.find_element(By.ID, "error").text
        )

        # Postcondition: no error, a positive duration (17 frames at 24 fps), the status line names the video
        shot = tmp_path / "fvrt-serve-page.png"
        page.save_screenshot(str(shot))
        assert page.find_element(By.ID, "error").text == ""
        assert page.execute_script(duration) == pytest.approx(17 / 24, abs=0.1)
        assert "completed" in page.find_element(By.ID, "status").text
        assert shot.stat().st_size > 0
    finally:
        page.quit()


def test_sigterm_drains_accepted_requests(served: Served) -> None:
    # Precondition: two requests accepted by the one replica (one runs, one waits)
    ids = [requests.post(f"{served.url}v1/videos", json={"prompt": PROMPT, "seed": s}, timeout=30).json()["id"]
           for s in (1, 2)]  # fmt: skip

    # Under test
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(TIMEOUT_S) == 0, served.log.read_text()[-3000:]

    # Postcondition: both finished and stored before the server stopped
    for video_id in ids:
        record = json.loads((served.results / f"{video_id}.json").read_text())
        assert record["status"] == "completed", record
        assert (served.results / f"{video_id}.mp4").stat().st_size > 0
    assert "2 requests finished, 0 left" in served.log.read_text()


@pytest.fixture(scope="module")
def foreign_bundle(tiny_engines: Path, module_tmp: Callable[[str], Path]) -> Path:
    """A bundle of the tiny engines whose manifest says another torch (2.0.0) built them."""
    other = module_tmp("foreign") / "engines"
    shutil.copytree(tiny_engines, other, copy_function=os.link)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["build"]["torch_version"] = "2.0.0"
    (other / "manifest.json").unlink()
    (other / "manifest.json").write_text(json.dumps(manifest))
    return pack(other, other.parent / "foreign.tar")[0]


def test_replica_refuses_a_bundle_for_another_torch_in_one_line(foreign_bundle: Path, tmp_path: Path) -> None:
    # Under test: a replica on a bundle another torch built
    replica = Replica(foreign_bundle, cache=tmp_path / "cache")

    # Postcondition: it stays up, not ready, with the one line; a request on it fails with that line
    assert not replica.ready
    assert replica.error is not None and "\n" not in replica.error
    assert replica.error.startswith("engines refused: ") and "built with torch 2.0.0" in replica.error
    assert replica.status()["ready"] is False

    async def events() -> list[dict[str, Any]]:
        return [e async for e in replica.run(VideoSpec({"prompt": PROMPT}))]

    assert asyncio.run(events())[-1] == {"event": "failed", "error": replica.error}
    replica.close()


def test_fvrt_serve_on_a_foreign_bundle_says_so_without_a_crash_loop(
    served: Served, foreign_bundle: Path, tmp_path: Path
) -> None:
    assert served.proc.poll() is not None  # after the SIGTERM test: one local cluster at a time
    port = _free_port()
    log = tmp_path / "fvrt-serve.log"
    cmd = [sys.executable, "-m", "fvrt.serve.cli", str(foreign_bundle), "--port", str(port), "--num-cpus", "1",
           "--results", str(tmp_path / "results"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while "fvrt-serve: serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        # the server's log: the refusal in one line, and "0 replicas warm"
        refusal = [line for line in log.read_text().splitlines() if line.startswith("fvrt-serve: engines refused")]
        assert len(refusal) == 1 and "built with torch 2.0.0, this machine has torch" in refusal[0]
        assert "(0 replicas warm" in log.read_text()
        # health says up, readiness says why not; a request fails with the line after trying twice
        assert requests.get(f"{url}healthz", timeout=10).status_code == 200
        ready = requests.get(f"{url}readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["problems"][0] == refusal[0].removeprefix("fvrt-serve: ")
        video = requests.post(f"{url}v1/videos", json={"prompt": PROMPT}, timeout=30).json()
        deadline = time.monotonic() + TIMEOUT_S
        while (state := requests.get(f"{url}v1/videos/{video['id']}", timeout=10).json())["status"] != "failed":
            assert state["status"] != "completed" and time.monotonic() < deadline, state
            time.sleep(0.2)
        assert "engines refused" in state["error"]["message"] and "tried 2 times" in state["error"]["message"]
        # the replica was never restarted
        assert log.read_text().count("Adding 1 replica to Deployment(name='VideoReplica'") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0, log.read_text()[-3000:]
