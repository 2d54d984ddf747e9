"""The torch-aot C++ compiler is chosen by building and loading a library (fvrt.builder.backends.cxx).

A stand-in for the H100 image's g++ 13 (whose AOTInductor libraries crash on load): a wrapper around the real g++
that links a constructor dereferencing NULL into every shared library it makes. The selection must skip it, an
explicit choice of it must fail with one line, and the answers must be cached."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fvrt.builder.backends import cxx

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture
def crashing_gxx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    boom_c = tmp_path / "boom.c"
    boom_c.write_text("__attribute__((constructor)) static void boom(void) { *(volatile int *)0 = 1; }\n")
    boom_o = tmp_path / "boom.o"
    subprocess.run(["gcc", "-fPIC", "-c", str(boom_c), "-o", str(boom_o)], check=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "crash-g++"
    real = shutil.which("g++")
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" -shared "*) exec {real} "$@" {boom_o} ;; *) exec {real} "$@" ;; esac\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FVRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FVRT_CXX", raising=False)
    return "crash-g++"


def test_selection_skips_a_compiler_whose_libraries_crash(crashing_gxx: str) -> None:
    chosen = cxx.select(names=[crashing_gxx, "g++"])
    assert chosen.path == shutil.which("g++")
    cache = json.loads(cxx.cache_file().read_text())
    errors = {v["compiler"]: v["error"] for v in cache.values()}
    assert errors[shutil.which(crashing_gxx)] == "its AOTInductor library crashes on load (signal 11)"
    assert errors[shutil.which("g++")] is None
    with pytest.raises(cxx.CompilerError, match=r"C\+\+ compiler 'crash-g\+\+' .*crashes on load"):
        cxx.select(crashing_gxx)  # explicit: no fallback; answered from the cache
    with pytest.raises(cxx.CompilerError, match=r"no C\+\+ compiler here builds AOTInductor libraries that load"):
        cxx.select(names=[crashing_gxx, "no-such-compiler"])


def test_candidates_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("g++-9", "g++-12", "g++-14"):
        (tmp_path / name).write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "my-c++")
    assert cxx.candidates() == ["my-c++", "g++", "c++", "g++-14", "g++-12", "g++-9", "clang++"]
