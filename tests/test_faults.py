"""The fault suite: every way a user or an operator can make `fvrt-run` / `fvrt-build` fail ends in one line on
stderr (no traceback), the documented exit code, and nothing left behind: no new file in the output folder, none
in the temporary folder, an older output intact.

fvrt-run runs as a real process (`tests/fault_cli.py`: the real command line with a stand-in pipeline, so a run
takes about a second and a fault can be injected mid-run); fvrt-build builds the tiny model's cheapest engines for
real. Disk-full cases mount a small tmpfs and are skipped, with the reason, where mounting is refused (not root).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fvrt.builder.build import ENGINE_NAMES
from fvrt.builder.engines import PRESET_PROFILES
from fvrt.runtime.manifest import FORMAT_VERSION, BuildEnv, Manifest, StageEntry, read_manifest, write_manifest
from fvrt.runtime.pipeline import ALL_ENGINES, BLOCK_PREFIX, IMAGE_ENGINES, PIPELINE_ENGINES, missing_engines
from fvrt.runtime.scratch import HOST

FAULT_CLI = Path(__file__).with_name("fault_cli.py")
TINY = PRESET_PROFILES["tiny"]
ENGINES = (*PIPELINE_ENGINES, BLOCK_PREFIX, *IMAGE_ENGINES)
TIMEOUT = 120  # seconds any one process may take
PAUSED = "paused"  # the marker file tests/fault_cli.py writes once the MP4's partial file exists


def _manifest(names: tuple[str, ...] | list[str]) -> Manifest:
    env = BuildEnv("0.1.0", torch.__version__, None, None, None, "2.3", None)
    stages = {n: StageEntry(n, "torch-aot", f"{n}.pt2", "0" * 64, "fp32", [], []) for n in names}
    profile = {k: v for k, v in TINY._asdict().items() if k != "name"}
    return Manifest(format_version=FORMAT_VERSION, profiles={TINY.name: profile}, stages=stages, build=env, config={})


@pytest.fixture(scope="module")
def dirs(module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    """An engine directory listing every engine, one lacking most (a `--stages text_in` build), a plain file."""
    root = module_tmp("faults")
    out = {"engines": root / "engines", "partial": root / "partial", "file": root / "file"}
    for key, names in (("engines", ENGINES), ("partial", ("text_in",))):
        out[key].mkdir()
        write_manifest(out[key], _manifest(list(names)))
    out["file"].write_text("not an engine directory")
    return out


class Run(NamedTuple):
    code: int
    stdout: str
    stderr: str


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "tmp"), "PYTHONUNBUFFERED": "1", **extra}


def run_cli(tmp: Path, *args: str | Path, stdin: str | None = None, **env: str) -> Run:
    r = subprocess.run(
        [sys.executable, str(FAULT_CLI), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(tmp, **env),
        check=False,
    )
    return Run(r.returncode, r.stdout, r.stderr)


def one_line(stderr: str, prog: str = "fvrt-run") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder`; skips the test where mounting is refused."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --------------------------------------------------------------------------------------------------------------
# fvrt-run: refused before any work


class Case(NamedTuple):
    args: tuple[str, ...]  # "{engines}", "{partial}", "{file}", "{out}", "{tmp}" are substituted
    message: str
    batch: str | None = None  # the batch file's text, written to {tmp}/jobs.jsonl


def _line(**kw: object) -> str:
    return json.dumps({"prompt": "a fox", "output": "{out}/a.mp4", **kw}) + "\n"


RUN_CASES = {
    # each of these crashed, ran the whole video for nothing, or misreported before the fault fixes
    "output_under_proc": Case(("--output", "/proc/x.mp4"), "--output /proc/x.mp4: cannot create files in /proc"),
    "output_under_sys": Case(("--output", "/sys/x.mp4"), "--output /sys/x.mp4:"),
    "seed_2_70": Case(("--seed", str(2**70)), f"--seed {2**70}: must be an integer from -2**63 to 2**64-1"),
    "seed_below_range": Case(("--seed", str(-(2**63) - 1)), "must be an integer from -2**63 to 2**64-1"),
    "batch_seed_2_70": Case(("--batch", "{tmp}/jobs.jsonl"), "line 2: --seed", _line() + _line(seed=2**70)),
    "device_bogus": Case(("--device", "bogus"), "--device bogus: not a device; choose one of cpu, cuda, cuda:N"),
    "device_meta": Case(("--device", "meta"), "--device meta: fvrt runs on cpu, cuda, cuda:N"),
    "engines_missing": Case(("{partial}",), "has no engine text_block, text_out, dit_prep, dit_in, dit_block"),
    "engine_dir_is_a_file": Case(("{file}",), "engine directory {file} is a file, not a directory"),
    "output_parent_is_a_file": Case(("--output", "{file}/x.mp4"), "--output {file}/x.mp4: {file} is not a directory"),
    # these were right already, kept so
    "empty_prompt": Case(("--prompt", " "), "--prompt: the prompt is empty"),
    "frames_not_8k1": Case(("--frames", "20"), "--frames 20: must be 8k+1"),
    "shape_not_built": Case(("--height", "256"), "the engines were not built for this shape"),
    "image_missing": Case(("--image", "{tmp}/none.png"), "cannot read the image"),
    "output_is_a_dir": Case(("--output", "{out}"), "is a directory"),
    "output_dir_missing": Case(("--output", "{out}/no/x.mp4"), "directory {out}/no does not exist"),
    "batch_not_json": Case(("--batch", "{tmp}/jobs.jsonl"), "line 1: not JSON", "prompt: a\n"),
    "batch_unknown_key": Case(("--batch", "{tmp}/jobs.jsonl"), "unknown key 'steps'", _line(steps=3)),
    "batch_same_output": Case(("--batch", "{tmp}/jobs.jsonl"), "line 2: --output", _line() + _line()),
}


@pytest.mark.parametrize("case", list(RUN_CASES), ids=list(RUN_CASES))
def test_run_refuses_in_one_line_and_writes_nothing(dirs: dict[str, Path], tmp_path: Path, case: str) -> None:
    # Precondition: an empty output folder and temporary folder
    out = tmp_path / "out"
    out.mkdir()
    c = RUN_CASES[case]
    subs = {k: str(v) for k, v in dirs.items()} | {"out": str(out), "tmp": str(tmp_path)}
    if c.batch is not None:
        (tmp_path / "jobs.jsonl").write_text(c.batch.replace("{out}", str(out)))
    args = [a.format(**subs) for a in c.args]
    if not args or args[0] not in (subs["partial"], subs["file"]):
        args.insert(0, subs["engines"])
    if "--batch" not in args and "--prompt" not in args:
        args += ["--prompt", "a fox"]
    if "--batch" not in args and "--output" not in args:
        args += ["--output", str(out / "a.mp4")]

    # Under test
    r = run_cli(tmp_path, *args)

    # Postcondition: exit 2, one line naming the problem, nothing written anywhere
    assert r.code == 2, r
    assert c.message.format(**subs) in one_line(r.stderr)
    assert list(out.iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []


def test_run_writes_and_is_deterministic(dirs: dict[str, Path], tmp_path: Path) -> None:
    """The stand-in run itself: an MP4, and the same bytes for the same request (the suite's baseline)."""
    outs = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for o in outs:
        r = run_cli(tmp_path, dirs["engines"], "--prompt", "a fox", "--output", o, "--seed", "3")
        assert r.code == 0 and f"wrote {o} (128x192x17 @ 24 fps" in r.stdout, r
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "tmp"]


def test_disk_full_writing_the_mp4(dirs: dict[str, Path], tmp_path: Path) -> None:
    """No room for the MP4: one line, exit 2, the older file intact, no partial file."""
    with small_tmpfs(tmp_path / "full", "64k") as full:
        (full / "a.mp4").write_bytes(b"the previous video")
        r = run_cli(tmp_path, dirs["engines"], "--prompt", "a fox", "--output", full / "a.mp4")
        assert r.code == 2, r
        assert f"disk full writing {full / 'a.mp4'}; nothing was written" in one_line(r.stderr)
        assert listing(full) == [("a.mp4", len(b"the previous video"))]


def test_server_answers_run_time_failures_and_serves_on(dirs: dict[str, Path], tmp_path: Path) -> None:
    """`--batch -`: lines that pass the checks but fail while they run are answered with their error; the lines
    after them are still served."""
    out = tmp_path / "out"
    out.mkdir()
    lines = [
        {"prompt": "a fox", "output": str(out / "a.mp4")},
        {"prompt": "a fox", "output": str(out / "b.mp4"), "seed": 2**70},
        {"prompt": "a fox", "output": "/proc/c.mp4"},
        {"prompt": "fail at run time", "output": str(out / "d.mp4")},
        {"prompt": "a fox", "output": str(out / "e.mp4"), "seed": 4},
    ]
    r = run_cli(tmp_path, dirs["engines"], "--batch", "-", stdin="".join(json.dumps(x) + "\n" for x in lines))

    assert r.code == 0, r
    answers = [json.loads(a) for a in r.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3, 4, 5]
    assert [a.get("output") for a in answers] == [str(out / "a.mp4"), None, None, None, str(out / "e.mp4")]
    assert "--seed" in answers[1]["error"] and "cannot create files in /proc" in answers[2]["error"]
    assert answers[3]["error"].startswith("stdin line 4: generation failed: RuntimeError")
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "e.mp4"]


def _partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


def _paused_run(tmp_path: Path, engines: Path, output: Path) -> subprocess.Popen[str]:
    """A run stopped while its MP4 is being written (the partial file exists); waits until it is there."""
    marker = tmp_path / PAUSED
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(FAULT_CLI), str(engines), "--prompt", "a fox", "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path, FVRT_FAULT_PAUSE=str(marker)),
        # a shell without job control starts background commands with SIGINT ignored, and Python then keeps it
        # ignored (no KeyboardInterrupt): give the run the default, as a terminal does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists() or not _partials(output.parent):  # the muxer creates the file with its first packet
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the MP4"
        time.sleep(0.05)
    assert len(_partials(output.parent)) == 1
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_while_the_mp4_is_written(dirs: dict[str, Path], tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM and SIGHUP end a run as Ctrl-C does: one line, exit 128 + the signal, no partial file, the older
    output intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.mp4").write_bytes(b"the previous video")
    proc = _paused_run(tmp_path, dirs["engines"], out / "a.mp4")

    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=TIMEOUT)

    assert proc.returncode == 128 + sig, stderr
    name = "Ctrl-C" if sig == signal.SIGINT else sig.name
    assert f"interrupted ({name}); the video in progress was not written" in one_line(stderr)
    assert listing(out) == [("a.mp4", len(b"the previous video"))]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_sigkill_leftover_is_removed_by_the_next_run(dirs: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL leaves the partial file; the next run into that folder removes it (its process is gone), and never
    one of a live process or of another host."""
    out = tmp_path / "out"
    out.mkdir()
    proc = _paused_run(tmp_path, dirs["engines"], out / "a.mp4")
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    [stale] = _partials(out)
    assert re.fullmatch(rf"\.a\.mp4\.{HOST}\.{proc.pid}\.partial", stale)
    live = f".b.mp4.{HOST}.{os.getpid()}.partial"  # this test process is alive
    other = ".c.mp4.another-host.1.partial"
    for name in (live, other):
        (out / name).write_bytes(b"in progress")

    r = run_cli(tmp_path, dirs["engines"], "--prompt", "a fox", "--output", out / "d.mp4")

    assert r.code == 0, r
    assert sorted(p.name for p in out.iterdir()) == sorted([live, other, "d.mp4"])


# --------------------------------------------------------------------------------------------------------------
# fvrt-build


def run_build(tmp: Path, *args: str | Path) -> subprocess.Popen[str]:
    code = "from fvrt.builder.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp),
    )


def build(tmp: Path, *args: str | Path) -> Run:
    proc = run_build(tmp, *args)
    stdout, stderr = proc.communicate(timeout=15 * TIMEOUT)
    return Run(proc.returncode, stdout, stderr)


def leftovers(tmp: Path, out: Path) -> list[str]:
    """Work in progress of builds of `out`: beside it, and the scratch folders in the temporary folder."""
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return beside + [p.name for p in (tmp / "tmp").iterdir() if p.name.startswith("fvrt-build-")]


def test_build_seed_out_of_range(tmp_path: Path) -> None:
    r = build(tmp_path, tmp_path / "e", "--random", "tiny", "--seed", str(2**70))
    assert r.code == 2, r
    assert f"--seed {2**70}: must be an integer from -2**63 to 2**64-1" in one_line(r.stderr, "fvrt-build")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


@pytest.mark.slow
def test_partial_builds_keep_or_refuse(module_tmp: Callable[[str], Path]) -> None:
    """`--stages` over an engine directory keeps the engines it does not build when they come from the same
    weights and options, refuses (naming them) when they do not, and replaces them only with --force."""
    tmp = module_tmp("partial-builds")
    out = tmp / "e"
    assert build(tmp, out, "--random", "tiny", "--stages", "text_in").code == 0

    r = build(tmp, out, "--random", "tiny", "--stages", "dit_in")
    assert r.code == 0, r
    assert "kept text_in" in r.stdout
    assert set(read_manifest(out).stages) == {"text_in", "dit_in"}

    r = build(tmp, out, "--random", "tiny", "--stages", "text_in")  # both there, same recipe: nothing to do
    assert r.code == 0 and "up to date" in r.stdout, r

    before = listing(out)
    r = build(tmp, out, "--random", "tiny", "--seed", "1", "--stages", "text_in")
    assert r.code == 2, r
    assert f"{out} also holds dit_in, built from other weights or options" in one_line(r.stderr, "fvrt-build")
    assert listing(out) == before

    r = build(tmp, out, "--random", "tiny", "--seed", "1", "--stages", "text_in", "--force")
    assert r.code == 0, r
    assert set(read_manifest(out).stages) == {"text_in"}
    assert leftovers(tmp, out) == []


def _wait_for_building(proc: subprocess.Popen[str], out: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_build_signal_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "e"
    proc = run_build(tmp_path, out, "--random", "tiny", "--stages", "text_in")
    _wait_for_building(proc, out)

    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=TIMEOUT)

    assert proc.returncode == 128 + sig, stderr
    assert f"interrupted ({sig.name}); nothing was written" in one_line(stderr, "fvrt-build")
    assert leftovers(tmp_path, out) == [] and not out.exists()


@pytest.mark.slow
def test_build_sigkill_leftovers_removed_by_the_next_build(tmp_path: Path) -> None:
    out = tmp_path / "e"
    proc = run_build(tmp_path, out, "--random", "tiny", "--stages", "text_in")
    _wait_for_building(proc, out)
    while not any(p.name.startswith("fvrt-build-") for p in (tmp_path / "tmp").iterdir()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert len(leftovers(tmp_path, out)) == 2  # the directory being built, the scratch folder

    r = build(tmp_path, out, "--random", "tiny", "--seed", "5", "--stages", "text_in")

    assert r.code == 0, r
    assert "left by a build that did not finish" in r.stdout
    assert leftovers(tmp_path, out) == [] and set(read_manifest(out).stages) == {"text_in"}


@pytest.mark.slow
def test_build_disk_full_is_one_line(tmp_path: Path) -> None:
    """A full disk mid-build (torch's archive writer fails inside a C++ call, then again in its destructor): one
    line, exit 2, nothing left on the full file system or in the temporary folder."""
    with small_tmpfs(tmp_path / "full", "300k") as full:
        r = build(tmp_path, full / "e", "--random", "tiny", "--stages", "text_in")
        assert r.code == 2, r
        assert f"disk full while building {full / 'e'}; nothing was written" in one_line(r.stderr, "fvrt-build")
        assert list(full.iterdir()) == [] and leftovers(tmp_path, full / "e") == []


def test_every_engine_name_is_known_to_the_pipeline_check() -> None:
    """The runtime's list of the engines a generation needs names exactly the engines the builder makes, and
    ALL_ENGINES (fvrt-run's `--batch -` default) is what an image generation needs from an empty directory."""
    assert set(PIPELINE_ENGINES) | set(IMAGE_ENGINES) | {BLOCK_PREFIX} == set(ENGINE_NAMES) == set(ALL_ENGINES)
    assert missing_engines([], image=True) == list(ALL_ENGINES)
    assert missing_engines([], image=False) == [n for n in ALL_ENGINES if n not in IMAGE_ENGINES]


def test_packages_load_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """memory="phase" opens each engine again for every video: its AOTInductor package is loaded once per process
    (a reload extracted and dlopened a fresh copy that was never unloaded: host memory grew ~7 MiB a video), and
    loaded again only when the file is replaced."""
    import torch._inductor

    from fvrt.runtime.backends import aoti

    loads: list[str] = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, **_: loads.append(path) or object())
    monkeypatch.setattr(aoti, "_PACKAGES", {})
    pkg = tmp_path / "text_in.pt2"
    pkg.write_bytes(b"one")
    first = aoti._load_package(pkg, -1)
    assert aoti._load_package(pkg, -1) is first and len(loads) == 1
    assert aoti._load_package(pkg, 0) is not first and len(loads) == 2  # another device
    pkg.unlink()
    pkg.write_bytes(b"two, rebuilt")
    assert aoti._load_package(pkg, -1) is not first and len(loads) == 3
