"""FlashAttention-4 (the `flash-attn-4` package, CuTe DSL kernels) as the DiT engines' attention: `--attention fa4`.

Why: on the H100, FA4's SM90 forward ran the stage-2 video self-attention (32,640 tokens, 32 heads x 128, bf16) in
24.6 ms against cuDNN's 27.5 ms through torch SDPA, with the same error against fp32 (1.12x; 1.69 vs 1.81 ms at
8,160 tokens; docs/results/2026-12-06-h100-attention-dit-gemm.md). It is exact attention, so no quality gate
applies beyond bf16 rounding.

How it reaches an AOTInductor engine: FA4's kernels are JIT-compiled by the CuTe DSL in Python and launched
through its own runtime, so neither Inductor (which compiles Triton, as `fvrt::fp8_attention` uses) nor a C++
custom op can hold them. `fvrt::fa4_attention` is a `torch.library.custom_op`; AOTInductor emits a call through
the dispatcher for it (its "proxy executor"), which lands back in this module's Python implementation. So:
- an engine built with `--attention fa4` needs this op registered before it is loaded: the runtime imports this
  module when a manifest records `attention: fa4` (`fvrt.runtime.engine.check_environment`), and refuses in one
  line when flash-attn-4 is missing or the GPU is not Hopper or Blackwell;
- FA4 JIT-compiles a kernel per attention shape class on its first call (about 2 s each on the H100), so the
  build compiles them at the engine's exact shapes (`traced_shapes` records them while the engine is exported) and
  ships them as object files in `fa4_kernels/<stage>/<FA4 source fingerprint>/fwd/` (`save_kernels`, listed with
  their sha256 in the manifest); the runtime loads them from there read-only (`use_kernels`). The fingerprint is
  FA4's own (its sources, Python, CuTe DSL and tvm-ffi versions): under another FA4 no file matches and the kernel
  compiles in memory as before, inside the warm-up call that precedes each CUDA-graph capture. The launches are
  captured like any other kernel (FA4 launches on torch's current stream);
- every other device runs the op as plain SDPA (the CPU fallback: same values, used by the CPU tests).

Layout: the op takes Q, K, V as [B, T, H, D] (FA4's layout; `attention` passes transposed views of the model's
[B, H, T, D], which FA4 reads through their strides without a copy) and returns [B, Tq, H, D], the layout the
output projection reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fvrt.plugins.support import cuda_support, import_problem, sdpa_bthd
from fvrt.runtime.precision import ATTENTION_MIN_CC

OP_NAME = "fvrt::fa4_attention"
MODE = "fa4"
NAME = "FlashAttention-4"
MIN_CC = ATTENTION_MIN_CC[MODE][0]  # FA4's forward kernels: SM90 (Hopper) and SM100 (Blackwell)
MAX_CC = (10, 99)
PACKAGE = "flash-attn-4"
INSTALL_HINT = "pip install flash-attn-4 (with nvidia-cutlass-dsl for the machine's CUDA)"
HEAD_DIMS = (64, 96, 128, 192, 256)  # FA4 forward head dims (multiples of 8 up to 256; these are the common ones)
KERNELS_DIR = "fa4_kernels"  # in the engine directory: <stage>/<FA4 source fingerprint>/fwd/<key hash>.o
EXPORTED_NAME = "func"  # the name FA4's JITPersistentCache gives the function in each object file

log = logging.getLogger(__name__)

# (q shape, k shape, v shape, dtype) of one call of the op, q/k/v as [B, T, H, D]
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], torch.dtype]
_recorders: list[set[Shapes]] = []  # the sets of the active `traced_shapes` contexts


def available() -> str | None:
    """None when flash-attn-4's CuTe interface can be imported, else why not (one line)."""
    return import_problem("flash_attn.cute", PACKAGE, INSTALL_HINT)


def version() -> str | None:
    """flash-attn-4's installed version (recorded in the manifest), None without it."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def supported(device: torch.device) -> str | None:
    """None when `device` can run the op's FA4 kernel, else why not (one line)."""
    return cuda_support(device, NAME, MIN_CC, MAX_CC, "Hopper (9.0) and Blackwell (10.x)") or available()


def _fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@torch.library.custom_op(OP_NAME, mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, scale 1/sqrt(D): q [B, Tq, H, D], k and v [B, Tk, H, D] -> [B, Tq, H, D] contiguous.
    CUDA: FlashAttention-4; elsewhere: SDPA (the fallback)."""
    if q.device.type == "cuda":
        return _fa4(q, k, v).contiguous()
    return sdpa_bthd(q, k, v)


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # symbolic (dynamic) shapes are not recorded: their kernels compile at first use
    if _recorders and all(isinstance(d, int) for t in (q, k, v) for d in t.shape):
        for shapes in _recorders:
            shapes.add((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype))
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@contextlib.contextmanager
def traced_shapes() -> Iterator[set[Shapes]]:
    """The shapes the op is traced at inside the context (torch.export and Inductor call its fake impl): what an
    engine's FA4 calls take, so the build can compile their kernels (`save_kernels`)."""
    shapes: set[Shapes] = set()
    _recorders.append(shapes)
    try:
        yield shapes
    finally:
        _recorders.remove(shapes)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, Tq, D] (a transposed view of the op's [B, Tq, H, D]); what
    `fvrt.builder.models.common.sdpa` calls under `kernel_attention("fa4")`."""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"FlashAttention-4 attention takes head dims {HEAD_DIMS}, got {q.shape[-1]}")
    out = fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def describe() -> dict[str, Any]:
    """What an engine built with this op records in its manifest entry."""
    return {"attention_kernel": PACKAGE, "attention_kernel_version": version()}


def kernel_file(key: Any) -> str:
    """The object file of FA4 compile key `key`, named as FA4's `JITPersistentCache` names it."""
    return hashlib.sha256(pickle.dumps(key)).hexdigest() + ".o"


def _kernel_folder(root: Path, stage: str) -> Path:
    """Where the forward kernels of engine `stage` lie in engine directory `root`: one folder per engine, as two
    engines may compile the same kernel and a rebuild of one must not replace a file the other's manifest entry
    hashed; under FA4's source fingerprint, as FA4 namespaces its own cache."""
    from flash_attn.cute import cache_utils

    return Path(root) / KERNELS_DIR / stage / cache_utils._compute_source_fingerprint() / "fwd"


def save_kernels(out_dir: Path, stage: str, shapes: Iterable[Shapes], device: torch.device) -> list[str]:
    """Compile FA4's forward kernels of engine `stage` at `shapes` (as `traced_shapes` records them) on `device`
    and export them into `out_dir` (see `_kernel_folder`); returns their paths relative to `out_dir`, sorted."""
    calls = sorted(set(shapes), key=repr)
    if not calls:
        return []
    from flash_attn.cute import cache_utils, interface

    fwd = interface._flash_attn_fwd
    folder = _kernel_folder(out_dir, stage)
    exporter = cache_utils.JITPersistentCache(folder)  # exports every kernel compiled while it is installed
    previous, fwd.compile_cache = fwd.compile_cache, exporter
    try:
        with torch.no_grad():
            for q, k, v, dtype in calls:
                fa4_attention(*(torch.randn(s, device=device, dtype=dtype) for s in (q, k, v)))
        torch.cuda.synchronize(device)
    finally:
        fwd.compile_cache = previous
    for key, fn in exporter.cache.items():  # this process (the build's verification) runs them without compiling
        previous[key] = fn
    for lock in folder.glob("*.lock"):  # FA4's file locks: the engine directory holds only manifest files
        lock.unlink()
    files = [folder / kernel_file(key) for key in exporter.cache]
    if missing := [f.name for f in files if not f.is_file()]:  # FA4 logs a failed export and goes on
        raise RuntimeError(f"engine {stage}: FlashAttention-4 did not export kernel {missing[0]} into {folder}")
    return sorted(f.relative_to(out_dir).as_posix() for f in files)


def _load_kernel(path: Path) -> Any:
    """The compiled function of one exported object file (as FA4's `JITPersistentCache` loads it)."""
    from cutlass import cute
    from flash_attn.cute import cache_utils  # noqa: F401 (its import preloads the runtime libraries they link to)

    return getattr(cute.runtime.load_module(str(path), enable_tvm_ffi=True), EXPORTED_NAME)


class ShippedKernels:
    """FA4's forward-kernel cache (duck-typed like its `JITCache`: `in`, `[]`, `get`, `[]=`, `clear`), backed by
    the kernels an engine directory ships, read-only: a miss there is FA4's miss (it compiles the kernel in memory
    and stores it here), a file that does not load is a miss too, and nothing is ever written into the folders."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = tuple(Path(f) for f in folders)
        self.cache: dict[Any, Any] = {}
        self.loaded = 0  # kernels loaded from the folders (each one a compile saved)

    def _load(self, key: Any) -> bool:
        name = kernel_file(key)
        for path in (f / name for f in self.folders):
            if not path.is_file():
                continue
            try:
                self.cache[key] = _load_kernel(path)
            except Exception as e:  # any failure (a truncated file, another CUDA): FA4 compiles the kernel instead
                log.warning(
                    "FlashAttention-4 kernel %s does not load (%s: %s); compiling it", path, type(e).__name__, e
                )
                continue
            self.loaded += 1
            return True
        return False

    def __contains__(self, key: Any) -> bool:
        return key in self.cache or self._load(key)

    def __getitem__(self, key: Any) -> Any:
        if key not in self:
            raise KeyError(key)
        return self.cache[key]

    def get(self, key: Any) -> Any:
        return self.cache[key] if key in self else None

    def __setitem__(self, key: Any, fn: Any) -> None:
        self.cache[key] = fn

    def clear(self) -> None:
        self.cache.clear()


def use_kernels(root: Path, stages: Sequence[str]) -> ShippedKernels | None:
    """Have FA4 load the forward kernels that engines `stages` of engine directory `root` ship instead of compiling
    them (kernels already in FA4's memory stay); returns the installed cache, the same one for the same folders.
    None where FA4 does not import or its internals are not the ones this was written against (4.0.0b40): kernels
    then compile at first use, as without shipped ones."""
    try:
        from flash_attn.cute import interface

        fwd = interface._flash_attn_fwd
        previous = fwd.compile_cache
        folders = [_kernel_folder(root, s) for s in stages]
    except (ImportError, AttributeError) as e:
        log.info("FlashAttention-4's kernel cache is not reachable (%s); kernels compile at first use", e)
        return None
    if isinstance(previous, ShippedKernels) and previous.folders == tuple(folders):
        return previous
    if not any(f.is_dir() for f in folders):  # built before kernels were shipped, or under another FA4
        log.info("%s: no FlashAttention-4 kernels for this flash-attn-4; they compile at first use", root)
    cache = ShippedKernels(folders)
    cache.cache.update(getattr(previous, "cache", {}))
    fwd.compile_cache = cache
    return cache


__all__ = [
    "KERNELS_DIR",
    "MODE",
    "OP_NAME",
    "ShippedKernels",
    "attention",
    "available",
    "describe",
    "fa4_attention",
    "kernel_file",
    "save_kernels",
    "supported",
    "traced_shapes",
    "use_kernels",
    "version",
]
