"""Build SageAttention 2's Hopper kernels (INT8 Q K^T, FP8 P V, `sageattn_qk_int8_pv_fp8_cuda_sm90`) from its source
into a folder that `--attention sage` (fvrt.plugins.sage_attention) imports: `sageattention` with only the two
extensions that path needs, `_qattn_sm90` and `_fused` (upstream's setup.py also builds its SM80 and SM89 kernels
for a Hopper target: eight more translation units that `--attention sage` never calls).

Why a script of our own: SageAttention 2 is not on the package index (the `sageattention` there is version 1, its
Triton kernels only), and its kernels launch on the legacy default stream (`<<<grid, block>>>`), which a CUDA graph
capture refuses (the engines run under CUDA graphs). The build therefore copies the source and, in the copy only,
gives every kernel launch of those two extensions torch's current stream. Nothing else in the source changes; the
patch is printed (launch sites, before -> after).

    python3 lab/sage_build.py --src SAGE_SOURCE --target /tmp/sage [--jobs 16] [--objects-only]

SAGE_SOURCE: a checkout of thu-ml/SageAttention (tested at d1a57a5, 2026-01-17: `git archive HEAD csrc sageattention
setup.py LICENSE`). Needs torch with CUDA headers, nvcc >= 12.3 (CUDA_HOME or nvcc on PATH) and ninja. The result
is `TARGET/sageattention/` (Python sources and the two .so files): put TARGET on PYTHONPATH. `--objects-only`
compiles the CUDA sources without linking (a dry run where Python's headers or libcuda differ from the target's).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

EXTENSIONS = {
    "sageattention._qattn_sm90": ["csrc/qattn/pybind_sm90.cpp", "csrc/qattn/qk_int_sv_f8_cuda_sm90.cu"],
    "sageattention._fused": ["csrc/fused/pybind.cpp", "csrc/fused/fused.cu"],
}
PATCHED = ("csrc/qattn/qk_int_sv_f8_cuda_sm90.cu", "csrc/fused/fused.cu")
STREAM = "at::cuda::getCurrentCUDAStream()"
STREAM_HEADER = "#include <ATen/cuda/CUDAContext.h>\n"
LAUNCH = re.compile(r"<<<([^<>;]*?)>>>")
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "--use_fast_math",
    "-diag-suppress=174",
    "-gencode",
    "arch=compute_90a,code=sm_90a",  # wgmma and setmaxnreg need the 90a target
]
CXX_FLAGS = ["-O3", "-std=c++17", "-DENABLE_BF16"]


def with_stream(args: str) -> str:
    """The launch configuration `args` ("grid, block[, smem[, stream]]") with torch's current stream."""
    parts = [p.strip() for p in args.split(",")]
    if len(parts) == 4:
        return args  # already names a stream
    if len(parts) == 2:
        parts.append("0")
    if len(parts) != 3:
        raise ValueError(f"unexpected launch configuration <<<{args}>>>")
    return ", ".join([*parts, STREAM])


def patch_streams(text: str) -> tuple[str, list[str]]:
    """Every `<<<...>>>` launch in `text` on torch's current stream; returns (text, the changed launch sites)."""
    changes: list[str] = []

    def sub(m: re.Match[str]) -> str:
        new = with_stream(m.group(1))
        if new != m.group(1):
            changes.append(f"<<<{m.group(1)}>>> -> <<<{new}>>>")
        return f"<<<{new}>>>"

    out = LAUNCH.sub(sub, text)
    if changes and STREAM_HEADER not in out:
        out = STREAM_HEADER + out
    return out, changes


def prepare(src: Path, work: Path) -> None:
    """Copy the source to `work` and patch the launches of PATCHED there."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src / "csrc", work / "csrc")
    shutil.copytree(src / "sageattention", work / "sageattention", ignore=shutil.ignore_patterns("*.so"))
    for extra in ("LICENSE",):
        if (src / extra).exists():
            shutil.copy2(src / extra, work / extra)
    for rel in PATCHED:
        path = work / rel
        text, changes = patch_streams(path.read_text())
        if not changes:
            raise SystemExit(f"{rel}: no kernel launch found to patch (another SageAttention version?)")
        path.write_text(text)
        print(f"{rel}: {len(changes)} launches on torch's current stream")
        for c in sorted(set(changes)):
            print(f"  {c}")


def compile_objects(work: Path) -> None:
    """The dry run: each patched .cu file compiled to an object file with nvcc, as the build would."""
    from ext_build import compile_objects as compile_cu

    compile_cu(work, [s for sources in EXTENSIONS.values() for s in sources], NVCC_FLAGS)


def build(work: Path, jobs: int) -> None:
    """Both extensions built in place (work/sageattention/_*.so) with torch's extension builder and ninja."""
    from ext_build import build_inplace
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    # the Hopper extension calls the driver API (cuTensorMapEncodeTiled): link libcuda, through the toolkit's stub
    # where the machine has no unversioned libcuda.so
    stubs = [str(p) for p in [Path(CUDA_HOME or "/usr/local/cuda") / "lib64" / "stubs"] if p.is_dir()]
    exts = [
        CUDAExtension(
            name=name,
            sources=sources,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            library_dirs=stubs if "sm90" in name else [],
            extra_link_args=["-lcuda"] if "sm90" in name else [],
        )
        for name, sources in EXTENSIONS.items()
    ]
    build_inplace(work, "sageattention", exts, jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, type=Path, help="SageAttention's source (csrc/ and sageattention/)")
    ap.add_argument("--target", required=True, type=Path, help="where sageattention/ goes (put it on PYTHONPATH)")
    ap.add_argument("--work", type=Path, default=None, help="build folder (default: TARGET/../sage-build)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--objects-only", action="store_true", help="compile the .cu files only (a dry run)")
    args = ap.parse_args()
    for need in ("csrc/qattn/qk_int_sv_f8_cuda_sm90.cu", "sageattention/core.py"):
        if not (args.src / need).is_file():
            sys.exit(f"{args.src}: not a SageAttention source folder (no {need})")
    work = args.work or args.target.parent / "sage-build"
    t = time.perf_counter()
    prepare(args.src, work)
    if args.objects_only:
        compile_objects(work)
        return
    build(work, args.jobs)
    built = sorted((work / "sageattention").glob("_*.so"))
    if len(built) != len(EXTENSIONS):
        sys.exit(f"expected {len(EXTENSIONS)} extensions in {work / 'sageattention'}, found {[p.name for p in built]}")
    args.target.mkdir(parents=True, exist_ok=True)
    dst = args.target / "sageattention"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(work / "sageattention", dst, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"built {', '.join(p.name for p in built)} in {time.perf_counter() - t:.0f} s -> {dst}")


if __name__ == "__main__":
    main()
