"""What the lab's kernel builds share (lab/sage_build.py, lab/fa3_build.py): torch's CUDA extension builder run in
place on a prepared copy of a project's source, and the dry run that compiles its CUDA sources to objects only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def build_inplace(work: Path, name: str, exts: list[Any], jobs: int) -> None:
    """`exts` (torch.utils.cpp_extension.CUDAExtension, sources relative to `work`) built in place in `work` with
    ninja, `jobs` compilations at a time, for Hopper (9.0a: WGMMA and setmaxnreg need the "a" target)."""
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    os.environ["MAX_JOBS"] = str(jobs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    cwd = Path.cwd()
    os.chdir(work)
    try:
        setup(
            name=name,
            ext_modules=exts,
            cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
            script_args=["build_ext", "--inplace"],
        )
    finally:
        os.chdir(cwd)


def compile_objects(work: Path, sources: list[str], flags: list[str], include_dirs: Sequence[str] = ()) -> None:
    """The dry run: each .cu of `sources` compiled to an object file in `work` with nvcc and `flags`, as the build
    would (torch's, Python's and the toolkit's headers on the include path)."""
    from torch.utils.cpp_extension import include_paths

    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    inc = [*include_dirs, *include_paths("cuda"), sysconfig.get_paths()["include"]]
    if cuda_home := os.environ.get("CUDA_HOME"):
        inc.append(str(Path(cuda_home) / "include"))
    for s in (s for s in sources if s.endswith(".cu")):
        t = time.perf_counter()
        obj = work / (Path(s).stem + ".o")
        cmd = [nvcc, "-c", s, "-o", str(obj), *(f"-I{p}" for p in inc), *flags, "-Xcompiler=-fPIC"]
        subprocess.run(cmd, cwd=work, check=True)
        print(f"compiled {s} in {time.perf_counter() - t:.0f} s ({obj.stat().st_size} bytes)", flush=True)
