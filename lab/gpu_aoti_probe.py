"""Why does no AOTInductor CUDA artifact load on the GPU machine (torch 2.11.0+cu130)?

Each variant runs in its own process (a crash ends only that variant) on a 2-layer MLP and prints one line:
its return code and the PROBE markers it reached. `gdb` re-runs the textbook package under cuda-gdb (the image
has no gdb) and prints the native backtrace of the crash. Usage: python3 lab/gpu_aoti_probe.py [variant ...]
"""

import os
import shutil
import subprocess
import sys
import tempfile

CODE = r"""
import os, sys, torch
from torch import nn
import torch._inductor.config as cfg
variant = sys.argv[1]
dev = "cpu" if variant == "cpu" else "cuda"
m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).to(dev).eval()
x = torch.randn(8, 64, device=dev)
if variant == "embed":
    cfg.aot_inductor.embed_kernel_binary = True
if variant == "nocg":
    cfg.aot_inductor.use_runtime_constant_folding = False
    cfg.triton.cudagraphs = False
if variant == "preload":
    import ctypes
    for lib in ("libcuda.so.1", "libcudart.so.13"):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            print("PROBE preload failed", lib, e, flush=True)
with torch.no_grad():
    ref = m(x)
    if variant == "jit_cpp":
        cfg.cpp_wrapper = True
        f = torch.compile(m)
        print("PROBE jit_cpp ran", float((f(x) - ref).abs().max()), flush=True)
    elif variant == "jit_py":
        f = torch.compile(m)
        print("PROBE jit_py ran", float((f(x) - ref).abs().max()), flush=True)
    elif variant == "so":
        so = torch._inductor.aot_compile(torch.export.export(m, (x,)).module(), (x,))
        print("PROBE compiled", so, flush=True)
        subprocess = __import__("subprocess")
        ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        print("PROBE ldd", ldd.replace(chr(10), " | "), flush=True)
        f = torch._export.aot_load(so, dev)
        print("PROBE loaded", flush=True)
        print("PROBE ran", float((f(x) - ref).abs().max()), flush=True)
    else:
        ep = torch.export.export(m, (x,))
        pkg = os.path.join(os.environ["PROBE_DIR"], variant + ".pt2")
        pkg = torch._inductor.aoti_compile_and_package(ep, package_path=pkg)
        print("PROBE packaged", pkg, flush=True)
        f = torch._inductor.aoti_load_package(pkg)
        print("PROBE loaded", flush=True)
        print("PROBE ran", float((f(x) - ref).abs().max()), flush=True)
"""

VARIANTS = ["cpu", "jit_py", "jit_cpp", "pkg", "embed", "nocg", "preload", "so", "gdb"]


def main() -> None:
    work = tempfile.mkdtemp(prefix="aoti_probe_")
    env = {**os.environ, "PROBE_DIR": work, "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "cache")}
    print(
        "torch",
        subprocess.run(
            [sys.executable, "-c", "import torch;print(torch.__version__, torch.version.cuda)"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "| cc",
        shutil.which("cc"),
        "| cuda-gdb",
        shutil.which("cuda-gdb"),
        flush=True,
    )
    print(
        subprocess.run(
            "cc --version | head -1; ldconfig -p | grep -E 'libcuda.so|libstdc' | head -5",
            shell=True,
            capture_output=True,
            text=True,
        ).stdout,
        flush=True,
    )
    for v in sys.argv[1:] or VARIANTS:
        if v == "gdb":
            cmd = [
                "cuda-gdb",
                "-batch",
                "-ex",
                "set pagination off",
                "-ex",
                "run",
                "-ex",
                "bt 40",
                "-ex",
                "info sharedlibrary",
                "--args",
                sys.executable,
                "-c",
                CODE,
                "pkg2",
            ]
        else:
            cmd = [sys.executable, "-X", "faulthandler", "-c", CODE, v]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        except subprocess.TimeoutExpired:
            print(v, "TIMEOUT", flush=True)
            continue
        marks = [ln[:400] for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
        print(f"== {v}: rc {r.returncode} {marks}", flush=True)
        if v == "gdb":
            keep = [ln for ln in r.stdout.splitlines() if ln.startswith("#") or "SIG" in ln or "signal" in ln]
            print("\n".join(keep[:60]), flush=True)
            print(r.stdout[-3000:], flush=True)
        elif r.returncode != 0:
            print(r.stderr[-1500:], flush=True)


if __name__ == "__main__":
    main()
