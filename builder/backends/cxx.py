"""The C++ compiler of AOTInductor's wrapper library, chosen by proof rather than by name.

Why: on the H100 image (Ubuntu 24.04, torch 2.11.0+cu130) every AOTInductor library built with the system
`g++` 13.3 crashes (SIGSEGV) as soon as it is loaded, CPU and CUDA alike: cuda-gdb puts the fault in
`std::regex` code inside the library's `torch::aot_inductor::parse_device_str`, called from the model
container's constructor. The same packages built with `g++-12` (present there) or with Debian's g++ 12 load and
run. A compiler that builds a library which then kills the process is found only by loading one, so fvrt builds
and loads a two-layer AOTInductor package in a child process (a crash ends only the child) with each candidate
until one works, and remembers the answer per compiler, compiler version and torch build.

Order: `--cxx` / `$FVRT_CXX` alone when given (an error if it fails); else `$CXX`, `g++`, `c++`, every
`g++-N` on PATH (newest first), `clang++`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

PROBE_TIMEOUT_S = 600
_PROBE = r"""
import sys, torch
from torch import nn
cxx, where = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)).eval()
x = torch.randn(4, 16)
with torch.no_grad():
    ep = torch.export.export(m, (x,))
    pkg = torch._inductor.aoti_compile_and_package(
        ep, package_path=where + "/probe.pt2", inductor_configs={"cpp.cxx": (None, cxx)})
    print("FVRT-PROBE built", flush=True)
    err = float((torch._inductor.aoti_load_package(pkg)(x) - m(x)).abs().max())
print("FVRT-PROBE ran", err, flush=True)
sys.exit(0 if err < 1e-4 else 3)
"""


class CompilerError(RuntimeError):
    """No usable C++ compiler (one line, for the CLI)."""


@dataclass(frozen=True)
class Compiler:
    path: str  # absolute path handed to Inductor (`cpp.cxx`)
    version: str  # first line of `--version`: recorded in the manifest and part of the build key


def cache_file() -> Path:
    root = os.environ.get("FVRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fvrt"
    )
    return Path(root) / "cxx-probe.json"


def version_line(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0].strip() if out.strip() else ""


def candidates() -> list[str]:
    """Default candidate names, most preferred first (see the module docstring)."""
    names = [os.environ.get("CXX") or "", "g++", "c++"]
    versioned: dict[int, str] = {}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        try:
            entries = os.listdir(d or ".")
        except OSError:
            continue
        for e in entries:
            m = re.fullmatch(r"g\+\+-(\d+)", e)
            if m:
                versioned.setdefault(int(m.group(1)), e)
    names += [versioned[k] for k in sorted(versioned, reverse=True)]
    names.append("clang++")
    out: list[str] = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def _key(c: Compiler) -> str:
    ident = [os.path.realpath(c.path), c.version, torch.__version__, sys.executable]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def probe(c: Compiler) -> str | None:
    """None when an AOTInductor library built by `c` loads and runs in a fresh process, else why not."""
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        cache = {}
    key = _key(c)
    if key in cache:
        return cache[key]["error"]
    with tempfile.TemporaryDirectory(prefix="fvrt-cxx-probe-") as tmp:
        # Inductor's own cache dir is kept: what the probe compiles first (headers, the wrapper's common code)
        # then serves the build that follows; its keys include the compiler, so compilers never mix.
        try:
            r = subprocess.run(
                [sys.executable, "-c", _PROBE, c.path, tmp],
                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"the probe did not finish in {PROBE_TIMEOUT_S} s"
    if r.returncode == 0:
        error = None
    elif "FVRT-PROBE built" in r.stdout and r.returncode < 0:
        error = f"its AOTInductor library crashes on load (signal {-r.returncode})"
    elif "FVRT-PROBE built" in r.stdout:
        error = f"its AOTInductor library loads but fails (exit {r.returncode})"
    else:
        tail = " ".join(r.stderr.strip().splitlines()[-1:])[:200]
        error = f"AOTInductor cannot build with it ({tail or f'exit {r.returncode}'})"
    cache[key] = {"compiler": c.path, "version": c.version, "torch": torch.__version__, "error": error}
    path = cache_file()
    try:  # best effort: a read-only home only costs a new probe next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp_path.replace(path)
    except OSError:
        pass
    return error


def resolve(name: str) -> Compiler | None:
    path = shutil.which(name)
    return None if path is None else Compiler(path, version_line(path))


def select(explicit: str | None = None, names: list[str] | None = None) -> Compiler:
    """The compiler to build with; CompilerError (one line) when none works."""
    explicit = explicit or os.environ.get("FVRT_CXX") or None
    if explicit:
        c = resolve(explicit)
        if c is None:
            raise CompilerError(f"C++ compiler '{explicit}' not found on PATH")
        error = probe(c)
        if error:
            raise CompilerError(f"C++ compiler '{explicit}' ({c.version}): {error}")
        return c
    tried = []
    for name in names if names is not None else candidates():
        c = resolve(name)
        if c is None:
            continue
        error = probe(c)
        if error is None:
            return c
        tried.append(f"{name}: {error}")
    if not tried:
        raise CompilerError("torch-aot needs a C++ compiler (g++ or clang++) on PATH; none found")
    raise CompilerError("no C++ compiler here builds AOTInductor libraries that load (" + "; ".join(tried) + ")")
