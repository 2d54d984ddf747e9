"""Build FlashAttention-3's Hopper forward kernels, head dim 128, bf16 and FP8 (E4M3), from its source into a folder
that lab/gpu_attention.py imports (`flash_attn_3._C`, the ops under `torch.ops.flash_attn_3`).

Why: FlashAttention-3's FP8 forward (WGMMA FP8, in-kernel V transpose, per-(batch, head) descales) is a
published Hopper attention whose paper reports close to 1.2 PFLOP/s (FP16: up to 740), the candidate for issue 18's
1.4x gate that SageAttention 2 (1.23x here) misses. It is not on the package index (`flash-attn-3` there is an
empty placeholder), and upstream's setup.py downloads its own nvcc and compiles about 100 translation units (every
head dim, dtype, split, paged-KV, softcap and backward variant). This script compiles the four that a non-causal,
unpadded head-dim-128 forward needs, with upstream's own switches turning the rest off
(FLASHATTENTION_DISABLE_*: the C++ API then refuses those cases in one line instead of linking them).

    python3 lab/fa3_build.py --src FA_SOURCE --cutlass CUTLASS_SOURCE --target /tmp/fa3 [--jobs 16]

FA_SOURCE: a checkout of Dao-AILab/flash-attention (`git archive HEAD hopper LICENSE`; tested at 0251105a,
2026-08-15); CUTLASS_SOURCE: NVIDIA/cutlass at the commit that checkout's `csrc/cutlass` submodule names
(7127592: `git archive 7127592 include LICENSE.txt`). Needs torch >= 2.9 with CUDA headers (the kernels are built
against torch's stable ABI, `flash_api_stable.cpp`), nvcc >= 12.3 and ninja. The result is TARGET/flash_attn_3/
(`import flash_attn_3._C` registers `torch.ops.flash_attn_3.fwd`): put TARGET on PYTHONPATH. `--objects-only`
compiles the sources without linking (a dry run). Unlike SageAttention's, these kernels launch on torch's current
stream already (CUDA-graph capture works unpatched).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

SOURCES = [
    "flash_api_stable.cpp",
    "instantiations/flash_fwd_hdim128_bf16_sm90.cu",
    "instantiations/flash_fwd_hdim128_e4m3_sm90.cu",
    "flash_prepare_scheduler.cu",
]
# upstream's feature switches (hopper/setup.py): everything but the head-dim-128 SM90 forward in bf16 and E4M3
DISABLED = [
    "BACKWARD",
    "SPLIT",
    "PAGEDKV",
    "APPENDKV",
    "LOCAL",
    "SOFTCAP",
    "PACKGQA",
    "FP16",
    "VARLEN",
    "CLUSTER",
    "HDIM64",
    "HDIM96",
    "HDIM192",
    "HDIM256",
    "SM8x",
    "HDIMDIFF64",
    "HDIMDIFF192",
]
FEATURE_ARGS = [f"-DFLASHATTENTION_DISABLE_{d}" for d in DISABLED]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--ftemplate-backtrace-limit=0",
    "--use_fast_math",
    "-lineinfo",
    "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",  # the WGMMA shapes the kernels use
    "-DCUTLASS_ENABLE_GDC_FOR_SM90",  # programmatic dependent launch
    "-DCUTLASS_DEBUG_TRACE_LEVEL=0",
    "-DNDEBUG",  # upstream: performance is severely impacted without it
    "-gencode",
    "arch=compute_90a,code=sm_90a",
]
STABLE_ARGS = ["-DTORCH_TARGET_VERSION=0x0209000000000000"]  # the stable ABI of torch >= 2.9, as upstream
CXX_FLAGS = ["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000"]


def config_module() -> str:
    """flash_attn_config.py as upstream's setup.py writes it, with this build's switches."""
    names = [
        "BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8", "VARLEN",
        "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x",
    ]  # fmt: skip
    flags = {f"FLASHATTENTION_DISABLE_{n}": n in DISABLED for n in names}
    flags["FLASHATTENTION_ENABLE_VCOLMAJOR"] = False
    flags |= {f"FLASH_ATTENTION_DISABLE_{n}": n in DISABLED for n in ("HDIMDIFF64", "HDIMDIFF192")}
    return f"# written by fvrt's lab/fa3_build.py\nCONFIG = {{'build_flags': {flags!r}}}\n"


def prepare(src: Path, work: Path) -> None:
    """Copy the Hopper sources to `work`, with the Python package and its config module."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src / "hopper", work, ignore=shutil.ignore_patterns("*.so", "__pycache__", "build"))
    (work / "flash_attn_config.py").write_text(config_module())
    if (src / "LICENSE").exists():
        shutil.copy2(src / "LICENSE", work / "LICENSE")


def include_dirs(work: Path, cutlass: Path) -> list[str]:
    return [str(work), str(cutlass / "include")]


def compile_objects(work: Path, cutlass: Path) -> None:
    """The dry run: each CUDA source compiled to an object file, as the build would."""
    from ext_build import compile_objects as compile_cu

    compile_cu(work, SOURCES, NVCC_FLAGS + FEATURE_ARGS + STABLE_ARGS, include_dirs(work, cutlass))


def build(work: Path, cutlass: Path, jobs: int) -> None:
    """flash_attn_3._C built in place (work/flash_attn_3/_C*.so) with torch's extension builder and ninja."""
    from ext_build import build_inplace
    from torch.utils.cpp_extension import CUDAExtension

    ext = CUDAExtension(
        name="flash_attn_3._C",
        sources=SOURCES,
        extra_compile_args={
            "cxx": CXX_FLAGS + STABLE_ARGS + FEATURE_ARGS,
            "nvcc": NVCC_FLAGS + FEATURE_ARGS + STABLE_ARGS,
        },
        include_dirs=include_dirs(work, cutlass),
        py_limited_api=True,
    )
    build_inplace(work, "flash_attn_3", [ext], jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, type=Path, help="flash-attention's source (hopper/)")
    ap.add_argument("--cutlass", required=True, type=Path, help="CUTLASS's source (include/)")
    ap.add_argument("--target", required=True, type=Path, help="where flash_attn_3/ goes (put it on PYTHONPATH)")
    ap.add_argument("--work", type=Path, default=None, help="build folder (default: TARGET/../fa3-build)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--objects-only", action="store_true", help="compile the sources only (a dry run)")
    args = ap.parse_args()
    for need in (*SOURCES, "flash_attn_3/__init__.py", "flash_attn_interface.py"):
        if not (args.src / "hopper" / need).is_file():
            sys.exit(f"{args.src}: not a flash-attention source folder (no hopper/{need})")
    if not (args.cutlass / "include" / "cute" / "tensor.hpp").is_file():
        sys.exit(f"{args.cutlass}: not a CUTLASS source folder (no include/cute/tensor.hpp)")
    work = args.work or args.target.parent / "fa3-build"
    t = time.perf_counter()
    prepare(args.src, work)
    if args.objects_only:
        compile_objects(work, args.cutlass)
        return
    build(work, args.cutlass, args.jobs)
    built = sorted((work / "flash_attn_3").glob("_C*.so"))
    if len(built) != 1:
        sys.exit(f"expected one extension in {work / 'flash_attn_3'}, found {[p.name for p in built]}")
    args.target.mkdir(parents=True, exist_ok=True)
    dst = args.target / "flash_attn_3"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(work / "flash_attn_3", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for mod in ("flash_attn_interface.py", "flash_attn_config.py"):  # the package imports both as top-level modules
        shutil.copy2(work / mod, args.target / mod)
    print(f"built {built[0].name} in {time.perf_counter() - t:.0f} s -> {dst}")


if __name__ == "__main__":
    main()
