"""`torch-aot` backend: `torch.export` + AOTInductor packages, with the weights kept apart from the code.

Every engine is exported as a pure function of (weights..., inputs...): a `torch.func.functional_call` wrapper
whose first inputs are the parameters and buffers the engine's forward actually reads, in a fixed order
(`StageEntry.weight_names`). The compiled packages therefore holds no checkpoint tensor, only code and
the few derived constants that the architecture alone fixes (RoPE frequency grids, resampling filters); the
weights go to `<engine>.safetensors`, and one build serves every checkpoint of the same architecture.

`dit_block` is one transformer block compiled once per shape key; its weights file holds `layers.{i}.<name>`
for each of the N blocks, and the runtime feeds them layer by layer, so build time and code size do not grow
with depth.

The video VAE engines built for CUDA store their 3-D convolution weights as [O, kD, kH, kW, I] ("ndhwc", see
`CONV_LAYOUTS`): the exported graph reads them through a permuted view, whose channels-last-3d strides make
Inductor's convolution lowering ask cuDNN for channels-last activations too (PyTorch's conv memory-format rule
follows the weight), so that the convs read and write the layout cuDNN's Hopper kernels use; with NCDHW weights and
activations cuDNN transposes each conv's input and output (84 + 42 kernels, 0.19 s of a 1.27 s 1080p decode on the
H100). CPU-tested for equal outputs; the GPU effect is not measured yet (docs/engines.md). The runtime passes the
file's tensors as they are; only builders (`to_file_layout`) know the layout, recorded as `extra["conv_layout"]`.

Shapes are static: one AOTInductor package per shape key (`<engine>.<key>.pt2`, key with `/` -> `_`), each
holding a single model, the documented and most exercised layout. Works with torch 2.11 (GPU machines) and
2.13 (CPU machines): only `torch.export.export`, `torch._inductor.aot_compile(..., {"aot_inductor.package":
True})`, `torch._inductor.package.package_aoti` and `aoti_load_package` are used.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fvrt.builder import stages
from fvrt.builder.backends import cxx as cxx_select
from fvrt.builder.backends.base import BackendOptions, Finish, OptionError, check_attention, per_layer_fields
from fvrt.builder.stages.base import EngineSpec
from fvrt.plugins import CALLBACK_ATTENTION, KERNEL_ATTENTION, fp8_attention
from fvrt.plugins.support import cudnn_first
from fvrt.runtime.manifest import StageEntry, TensorSpec, sha256_file

PACKAGE_SUFFIX = ".pt2"
WEIGHTS_SUFFIX = ".safetensors"
LAYER_PREFIX = "layers.{}."  # per-layer weight names in the dit_block weights file (runtime reads the same)
# SDPA backend baked into CUDA engines at export time. The kernel modes (fvrt.plugins.KERNEL_ATTENTION) reach the
# DiT engines only: "fp8"/"fp8s" (fvrt.plugins.fp8_attention, a Triton kernel compiled into the engine), "fa4"
# (fvrt.plugins.fa4_attention, FlashAttention-4), "sage" (fvrt.plugins.sage_attention, SageAttention 2),
# "fa3fp8" (fvrt.plugins.fa3_attention, FlashAttention-3 FP8) and "fa3" (fvrt.plugins.fa3_exact, its bf16 kernel), the
# last four called back through the dispatcher
# (fvrt.plugins.CALLBACK_ATTENTION); every other stage keeps bf16 cuDNN attention.
ATTENTION_CHOICES = ("default", "cudnn", *KERNEL_ATTENTION)

Log = Callable[[str], None]

# How 5-D (3-D convolution) weights are stored in an engine's weights file: "ncdhw" as the checkpoint holds them,
# "ndhwc" permuted to [O, kD, kH, kW, I]. "auto": ndhwc for the video VAE engines on CUDA, ncdhw elsewhere.
CONV_LAYOUTS = ("ncdhw", "ndhwc")
CONV_LAYOUT_CHOICES = ("auto", *CONV_LAYOUTS)
CONV_LAYOUT_STAGES = tuple(e.name for e in stages.ENGINES if e.conv_layout)  # the video VAE's engines


def stage_conv_layout(choice: str, stage: str, device: torch.device) -> str:
    """The layout (CONV_LAYOUTS) of `stage`'s 3-D conv weights for the build option `choice`
    (CONV_LAYOUT_CHOICES): only the video VAE engines take one other than ncdhw."""
    if choice not in CONV_LAYOUT_CHOICES:
        raise ValueError(f"conv layout must be one of {', '.join(CONV_LAYOUT_CHOICES)}, got '{choice}'")
    if stage not in CONV_LAYOUT_STAGES:
        return "ncdhw"
    if choice == "auto":
        return "ndhwc" if device.type == "cuda" else "ncdhw"
    return choice


def to_file_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A weight as the engine's weights file holds it: 5-D tensors [O, I, kD, kH, kW] -> [O, kD, kH, kW, I]
    (a contiguous copy) for "ndhwc"; anything else as it is."""
    return t.permute(0, 2, 3, 4, 1).contiguous() if layout == "ndhwc" and t.ndim == 5 else t


def from_file_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of `to_file_layout` as a view: [O, kD, kH, kW, I] -> [O, I, kD, kH, kW] with channels-last-3d
    strides (inside the exported graph; no copy)."""
    return t.permute(0, 4, 1, 2, 3) if layout == "ndhwc" and t.ndim == 5 else t


_ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}  # safetensors dtype names (format spec)


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream `tensors` into a safetensors file (temporary file, then rename): one tensor in host memory at a
    time, 0-d tensors and tensors sharing storage (tied weights) included."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    names = sorted(tensors)
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        header[n] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data section, as the reference writer does
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for n in names:
                t = tensors[n].detach().to("cpu").contiguous().reshape(-1)
                if t.numel():
                    f.write(t.view(torch.uint8).numpy().tobytes())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def package_name(engine: str, shape_key: str) -> str:
    """The package file of one shape key: "dit_block", "1080p/s1" -> "dit_block.1080p_s1.pt2"."""
    return f"{engine}.{re.sub(r'[^A-Za-z0-9_]', '_', shape_key)}{PACKAGE_SUFFIX}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class WeightsAsInputs(nn.Module):
    """`module` as a pure function: forward(*weights, *inputs) = functional_call(module, weights, inputs).

    The module is held outside `nn.Module` registration, so torch.export lifts none of its tensors: the ones in
    `names` arrive as inputs, and any other tensor the forward reads becomes an export constant (kept small:
    `build` records their bytes). `conv_layout`: how the weight inputs hold 5-D tensors (`to_file_layout`)."""

    def __init__(self, module: nn.Module, names: Sequence[str], conv_layout: str = "ncdhw") -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", module)
        self.names = list(names)
        self.conv_layout = conv_layout

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self.names)
        weights = {k: from_file_layout(w, self.conv_layout) for k, w in zip(self.names, args[:n], strict=True)}
        out = torch.func.functional_call(self.wrapped, weights, args[n:])
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(_unaliased(o, args, outs[:i]) for i, o in enumerate(outs))


def _unaliased(out: torch.Tensor, inputs: Sequence[torch.Tensor], earlier: Sequence[torch.Tensor]) -> torch.Tensor:
    """`out`, cloned when it is (a view of) an input or repeats an earlier output: compiled programs then own
    every output buffer (a pass-through output, e.g. the prep engine's `video_index`, is a copy)."""
    base = out._base if out._base is not None else out
    for t in (*inputs, *earlier):
        if t is out or t is base or (t._base is not None and t._base is base):
            return out.clone()
    return out


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (persistent or not) by name, duplicates (tied weights) once."""
    out = {n: p.detach() for n, p in module.named_parameters()}
    out.update({n: b for n, b in module.named_buffers()})
    return out


def stage_attention(attention: str, stage: str, device: torch.device) -> str:
    """The attention an engine of `stage` gets: CPU engines always "default"; FP8 modes reach only the DiT."""
    return stages.stage_attention(attention, stage) if device.type == "cuda" else "default"


@contextlib.contextmanager
def attention_backend(attention: str, device: torch.device) -> Iterator[None]:
    """Export/compile under the chosen SDPA backend: the exported graph holds the backend-specific op (or, for
    the kernel modes, their attention op and, where it has one, its quantization).

    Every CUDA mode, the kernel modes included, exports and compiles under `cudnn_first()`: export keeps SDPA as
    `aten.scaled_dot_product_attention`, and the backend is chosen when AOTInductor decomposes it, so the
    attentions a kernel mode leaves to SDPA (sage's below MIN_TOKENS) are cuDNN's only if the compile runs under
    that order too. Without it torch's default order picked FlashAttention-2 there (1.7x slower than cuDNN at
    8,160 tokens on the H100: sage engines' stage-1 pass 0.558 s vs cuDNN engines' 0.490 s, 2026-12-07)."""
    if attention == "default" or device.type != "cuda":
        yield
        return
    with cudnn_first():
        if attention in KERNEL_ATTENTION:
            from fvrt.builder.models.common import kernel_attention

            with kernel_attention(attention):
                yield
        else:
            yield


def export(
    module: nn.Module,
    names: Sequence[str],
    weights: Sequence[torch.Tensor],
    inputs: Sequence[Any],
    conv_layout: str = "ncdhw",
) -> Any:
    """torch.export of `WeightsAsInputs(module, names, conv_layout)` at the static shapes of (weights, inputs);
    `weights` in the file layout."""
    with torch.no_grad():
        return torch.export.export(WeightsAsInputs(module, names, conv_layout), (*weights, *inputs), strict=False)


# Tensor properties that read metadata only; a tensor read only through them is not an engine input.
_METADATA = frozenset({"dtype", "shape", "device", "ndim", "layout", "is_cuda", "is_meta", "requires_grad"})


class _TensorUseRecorder(TorchFunctionMode):
    """Records which of the given tensors (by identity) any torch function receives."""

    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids, self.seen = ids, set()

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" and getattr(func.__self__, "__name__", "") in _METADATA:
            return func(*args, **kwargs)  # `w.dtype`, `w.shape`...: not a use of the data
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.ids:
                self.seen.add(id(leaf))
        return func(*args, **kwargs)


def used_weight_names(module: nn.Module, inputs: Sequence[Any]) -> list[str]:
    """The parameters/buffers the forward reads on `inputs`, in module order, found by running it once eagerly
    and recording which of them any torch function receives. Wrapper engines hold whole models (the DiT's prep
    engine holds all 48 blocks), so only this subset becomes the engine's weights. A miss cannot go unnoticed:
    `compile_key` refuses an export that baked a module tensor in as a constant."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    recorder = _TensorUseRecorder({id(t) for t in named.values()})
    with torch.no_grad(), recorder:
        module(*inputs)
    return [n for n, t in named.items() if id(t) in recorder.seen]


def _check_no_baked_weights(ep: Any, module: nn.Module, name: str) -> None:
    """Refuse an exported program holding one of the module's weights as a constant (it must be an input)."""
    ptrs = {t.data_ptr(): n for n, t in module_tensors(module).items() if t.numel() > 1}
    for cname, c in ep.constants.items():
        if isinstance(c, torch.Tensor) and c.numel() > 1 and c.data_ptr() in ptrs:
            raise RuntimeError(f"engine {name}: weight {ptrs[c.data_ptr()]} was baked into the code as {cname}")


def _drop_guards(gm: torch.fx.GraphModule) -> None:
    """`ExportedProgram.module()` may add an input-guard submodule that AOTI cannot compile (torch 2.13's
    `aot_compile` removes it itself; do it here for every version)."""
    if hasattr(gm, "_guards_fn"):
        for node in list(gm.graph.find_nodes(op="call_module", target="_guards_fn")):
            gm.graph.erase_node(node)
        delattr(gm, "_guards_fn")
        gm.recompile()


def inductor_options(cxx: str | None = None, device: str = "cuda") -> dict[str, Any]:
    """AOTInductor options of every fvrt engine.

    `emulate_precision_casts`: round every intermediate to its eager dtype as eager PyTorch does. Without it
    Inductor keeps fused bf16 arithmetic in fp32, and the official bf16 RoPE arithmetic on 1080p pixel positions
    (angles up to ~1e4 rad) then gives cos/sin tables 0.43 (self) to 0.83 (A<->V) relative error away from eager
    (measured on the H100 and reproduced on CPU; exact with the option). `cxx`: the C++ compiler of the wrapper
    (see `fvrt.builder.backends.cxx`); None keeps Inductor's own choice.

    CPU builds (`device` "cpu") compile the wrapper, which only sequences kernel and library calls, at -O0
    instead of Inductor's -O1: the tiny audio decoder's 7,500-line wrapper then compiles in 8.0 s instead of
    19.5 s, and its engine gives bit-identical output in the same time (228 ms vs 229 ms per call, best of 15,
    one thread; 2-core CPU machine, 2026-12-07). CUDA builds keep -O1 until the same comparison has run on a GPU
    (CUDA-graph replay does not run the wrapper; an ungraphed call does).
    """
    opts: dict[str, Any] = {"aot_inductor.package": True, "emulate_precision_casts": True}
    if device == "cpu":
        opts["aot_inductor.compile_wrapper_opt_level"] = "O0"
    if cxx is not None:
        opts["cpp.cxx"] = (None, cxx)
    return opts


@contextlib.contextmanager
def without_input_check_codegen() -> Iterator[bool]:
    """Compile wrappers without AOTInductor's per-input check functions; yields whether they were removed.

    AOTInductor writes one `check_input_<i>` C++ function per graph input (dtype, every size and stride, device,
    each failure with its own stringstream message) into the wrapper, and runs them only when the process has
    AOTI_RUNTIME_CHECK_INPUTS set. fvrt engines take their weights as inputs, so the tiny audio decoder's wrapper
    had 696 of them: 44,000 of its 51,700 lines, and most of its 37 s single-threaded `g++ -O1` (measured on the
    2-core CPU machine, 2026-12-07). The runtime never sets the variable: it checks every call's inputs itself
    (`fvrt.runtime.backends.aoti`) and the weights at load. Torch 2.11 and 2.13 generate these functions in
    `CppWrapperCpu.generate_input_output_runtime_checks` from `V.graph.graph_inputs` alone (CUDA wrappers
    inherit it), so that method runs here on an empty input table: it still defines the (then empty)
    `__check_inputs_outputs` that `run_impl` calls. A torch without the method compiles unchanged (False)."""
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
        from torch._inductor.virtualized import V
    except ImportError:
        yield False
        return
    original = CppWrapperCpu.__dict__.get("generate_input_output_runtime_checks")
    if original is None:
        yield False
        return

    def no_input_checks(self: Any) -> Any:
        graph = V.graph
        inputs = graph.graph_inputs
        graph.graph_inputs = {}
        try:
            return original(self)
        finally:
            graph.graph_inputs = inputs

    CppWrapperCpu.generate_input_output_runtime_checks = no_input_checks  # type: ignore[method-assign]
    try:
        yield True
    finally:
        CppWrapperCpu.generate_input_output_runtime_checks = original  # type: ignore[method-assign]


def compile_program(ep: Any, args: Sequence[Any], cxx: str | None = None) -> list[Any]:
    """AOTInductor-compile an exported program; returns the generated files (for `package_aoti`)."""
    gm = ep.module()
    _drop_guards(gm)
    with torch.no_grad(), warnings.catch_warnings(), without_input_check_codegen():
        # torch 2.13 warns about its own pytree internals while packaging; not actionable here
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        device = "cuda" if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args) else "cpu"
        files = torch._inductor.aot_compile(gm, tuple(args), options=inductor_options(cxx, device))
    if not isinstance(files, list):
        raise RuntimeError(f"AOTInductor returned {type(files).__name__}, expected the list of package files")
    return files


def _output_specs(ep: Any) -> list[tuple[list[int], str]]:
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = [a.meta["val"] for a in out_node.args[0]]
    return [([int(s) for s in v.shape], dtype_name(v.dtype)) for v in vals]


def _constant_bytes(ep: Any) -> int:
    consts = [t for t in ep.constants.values() if isinstance(t, torch.Tensor)]
    consts += [t for t in ep.state_dict.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in consts)


@dataclass
class CompiledKey:
    """Per shape key: the compiled files, the I/O shapes and where the time went. `pending`: the compile running
    in a worker process (`CompilePool`), whose result replaces `files` and `compile_s`."""

    files: list[Any]
    input_shapes: list[tuple[list[int], str]]
    output_shapes: list[tuple[list[int], str]]
    export_s: float
    compile_s: float
    constants_bytes: int
    pending: Future[tuple[list[str], float]] | None = field(default=None, compare=False)


ArgLayout = tuple[tuple[int, ...], tuple[int, ...], str, str]  # size, stride, dtype name, device


@dataclass(frozen=True)
class CompileJob:
    """One compile for a worker process: the exported program (a `torch.export.save` file), the layouts of its
    example inputs, and what the in-process compile runs under (compiler, SDPA backend)."""

    program: str
    args: tuple[ArgLayout, ...]
    cxx: str | None
    attention: str
    threads: int  # Inductor's own compile processes (Triton kernels) in this worker: the machine's CPUs / jobs


def _layout(t: torch.Tensor) -> ArgLayout:
    return tuple(t.shape), tuple(t.stride()), dtype_name(t.dtype), str(t.device)


def _example(layout: ArgLayout) -> torch.Tensor:
    """A tensor of that layout. AOTInductor reads only shapes, strides, dtypes and devices from its example
    inputs (its Triton autotuning times them, whatever their values), so zeros stand in for the weights."""
    size, stride, dtype, device = layout
    t = torch.empty_strided(size, stride, dtype=getattr(torch, dtype), device=device)
    with contextlib.suppress(RuntimeError, NotImplementedError):  # a dtype without fill_ stays uninitialised
        t.zero_()
    return t


def compile_job(job: CompileJob) -> tuple[list[str], float]:
    """Run in a worker process: load the program, compile it as `compile_program` does in the build process;
    returns the generated files (on this machine's disk, for `package_aoti`) and the seconds it took."""
    t0 = time.perf_counter()
    from fvrt.builder.quant import fp8, nvfp4  # noqa: F401 (their ops must exist before the program loads)

    if job.attention in fp8_attention.MODES:
        fp8_attention.register()
    torch._inductor.config.compile_threads = job.threads  # read when Inductor starts its pool, at the first compile
    ep = torch.export.load(job.program)
    args = [_example(a) for a in job.args]
    device = next((torch.device(a[3]) for a in job.args if a[3].startswith("cuda")), torch.device("cpu"))
    with attention_backend(job.attention, device):
        files = compile_program(ep, args, job.cxx)
    return [str(f) for f in files], time.perf_counter() - t0


# GPU memory a CUDA compile worker needs beyond its example inputs: its CUDA context (~0.5 GiB), and Inductor's
# autotuning run of the whole graph on those inputs (a 1080p DiT block's activations: a few GiB). An estimate
# that errs high, not a measurement: the gate below only decides how many compiles run at once.
WORKER_GPU_HEADROOM = 6 << 30


def _strided_bytes(t: torch.Tensor) -> int:
    """The bytes `torch.empty_strided(t.shape, t.stride())` allocates (what `_example` makes of `t` in a worker),
    whatever storage `t` itself is a view of."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))) * t.element_size()


def _cuda_bytes(args: Sequence[Any]) -> tuple[torch.device | None, int]:
    """The CUDA device of `args` and the bytes a worker allocates there for them (its zero example inputs)."""
    cuda = [a for a in args if isinstance(a, torch.Tensor) and a.is_cuda]
    if not cuda:
        return None, 0
    return cuda[0].device, sum(_strided_bytes(a) for a in cuda)


def _worker_gpu_need(args: Sequence[Any]) -> tuple[torch.device | None, int, int]:
    """The CUDA device of `args` (None: a CPU compile), the bytes of a worker's copies of them, and what a worker
    compiling with them needs free on that GPU (the copies plus `WORKER_GPU_HEADROOM`)."""
    device, inputs = _cuda_bytes(args)
    return device, inputs, inputs + WORKER_GPU_HEADROOM


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


class CompilePool:
    """`jobs` worker processes that compile exported programs while the build process exports the next engines
    (`fvrt-build --jobs N`). Export needs the model and stays in the build process; an AOTInductor compile needs
    only the program and the layouts of its inputs, and spends its time in Python code generation and one
    single-threaded C++ compile of the wrapper, so compiles of different engines run side by side. Workers are
    spawned, not forked: the build process may hold a CUDA context. Programs are saved under the folder given
    to `submit` (the temporary build directory) and removed when their compile has been collected.

    A CUDA worker allocates its own copy of the engine's inputs (the weights among them: 1.9 GiB for text_in's
    embedding table) and runs the graph once to autotune, in its own CUDA context. A full-size build whose
    process holds the calibrated pipeline (75 GiB of an 80 GiB H100 in `scripts/bench.py`, 2026-12-08) has no
    room for that, so `admit` lets a CUDA compile go to a worker only while the GPU's free memory covers it and
    the compiles still running; otherwise it waits for one of them, and with none running the compile stays in
    the build process, which passes its own tensors and needs no copy."""

    def __init__(self, jobs: int, free_gpu_bytes: Callable[[torch.device], int] | None = None) -> None:
        if jobs < 2:
            raise ValueError(f"a compile pool needs at least 2 jobs, got {jobs}")
        self.jobs = jobs
        self._executor: ProcessPoolExecutor | None = None
        self._count = 0
        self._free_gpu_bytes = free_gpu_bytes or (lambda device: torch.cuda.mem_get_info(device)[0])
        self._running: dict[Future, int] = {}  # CUDA compiles handed out and not yet done -> bytes reserved
        self.refusal = ""  # why `admit` last kept a compile in the build process

    def admit(self, args: Sequence[Any]) -> bool:
        """Whether a worker may compile a program with example inputs `args` (see the class). CPU compiles always
        may. A CUDA compile needs its inputs' bytes plus `WORKER_GPU_HEADROOM` free on the GPU, after what the
        running CUDA compiles were granted; while that is short and a compile runs, this waits for one to end.
        False (with `refusal` saying why) when the GPU is short with none running, even after the build process
        has returned its allocator's cached blocks to the driver."""
        self.refusal = ""
        device, inputs, need = _worker_gpu_need(args)
        if device is None:
            return True
        emptied = False
        while True:
            self._running = {f: b for f, b in self._running.items() if not f.done()}
            free = self._free_gpu_bytes(device) - sum(self._running.values())
            if free >= need:
                return True
            if self._running:
                wait(list(self._running), return_when=FIRST_COMPLETED)
            elif not emptied:
                torch.cuda.empty_cache()
                emptied = True
            else:
                self.refusal = (
                    f"{_gib(max(free, 0))} free on the GPU, a worker needs {_gib(need)} "
                    f"({_gib(inputs)} of inputs): compiled in the build process"
                )
                return False

    def submit(self, ep: Any, args: Sequence[torch.Tensor], cxx: str | None, attention: str, folder: Path) -> Future:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        folder.mkdir(parents=True, exist_ok=True)
        self._count += 1
        program = folder / f"{self._count}.program.pt2"
        # torch.export.save writes the program's example inputs too, and they are the engine's weights (copied off
        # the GPU, written, and loaded again by the worker beside its zeros): left out
        examples = ep.example_inputs
        ep.example_inputs = None
        try:
            torch.export.save(ep, str(program))
        finally:
            ep.example_inputs = examples
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        job = CompileJob(str(program), tuple(_layout(a) for a in args), cxx, attention, threads)
        future = self._executor.submit(compile_job, job)
        device, _, need = _worker_gpu_need(args)
        if device is not None:
            self._running[future] = need
        return future

    def close(self) -> None:
        """Cancel what has not started and stop the workers (at once: a failed build does not wait for them)."""
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(timeout=10)


class TorchAOTBackend:
    """The `torch-aot` backend object (see fvrt.builder.backends)."""

    name = "torch-aot"
    attention_choices = ATTENTION_CHOICES
    rebinds = True  # the code depends on the architecture only: a new checkpoint gets a new weights file
    errors: tuple[type[Exception], ...] = ()

    def __init__(self, attention: str = "default", cxx: str | None = None, conv_layout: str = "auto") -> None:
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got '{attention}'")
        if conv_layout not in CONV_LAYOUT_CHOICES:
            raise ValueError(f"conv layout must be one of {', '.join(CONV_LAYOUT_CHOICES)}, got '{conv_layout}'")
        self.attention = attention
        self.conv_layout = conv_layout  # CONV_LAYOUT_CHOICES, resolved per stage by `stage_conv_layout`
        self.cxx = cxx  # explicit compiler (--cxx); None: $FVRT_CXX or the first candidate that works
        self._compiler: cxx_select.Compiler | None = None
        self.device = torch.device("cpu")  # where the build runs (`configure`): resolves conv_layout "auto"
        self.pool: CompilePool | None = None  # --jobs N > 1: compiles in N worker processes (`configure`)

    @property
    def compiler(self) -> cxx_select.Compiler:
        """The C++ compiler of the wrapper library, proven to build libraries that load (see backends.cxx)."""
        if self._compiler is None:
            self._compiler = cxx_select.select(self.cxx)
        return self._compiler

    def available(self) -> str | None:
        """None when AOTInductor can build here, else the reason (it needs a working C++ compiler)."""
        if not hasattr(torch._inductor, "aot_compile"):
            return f"torch {torch.__version__} has no AOTInductor (torch._inductor.aot_compile)"
        try:
            self.compiler  # noqa: B018 (probe now: a bad compiler is a one-line error before any work)
        except cxx_select.CompilerError as e:
            return str(e)
        return None

    def refuse_precision(self, precision: str) -> str | None:
        return None  # every precision of the table: low-bit layers compile through their torch ops

    def recipe(self) -> dict[str, Any]:
        return {"cxx": self.compiler.version or self.compiler.path}  # the wrapper library depends on its compiler

    def environment(self) -> dict[str, str | None]:
        return {}  # the build machine's compute capability; no TensorRT

    def engine_recipe(self, name: str) -> dict[str, Any]:
        """The conv layout of engine `name` when it is not the checkpoint's (the code reads it)."""
        layout = stage_conv_layout(self.conv_layout, name, self.device)
        return {"conv_layout": layout} if layout != "ncdhw" else {}

    def compile_key(
        self,
        spec: EngineSpec,
        key: str,
        names: Sequence[str],
        weights: Sequence[torch.Tensor],
        device: torch.device,
        conv_layout: str = "ncdhw",
        program_dir: Path | None = None,
    ) -> CompiledKey:
        """Export and compile engine `spec` for shape key `key` with `weights` (ordered as `names`, in the file
        layout `conv_layout`) as inputs. With a compile pool and `program_dir`, the compile is handed to a worker
        (the program saved under `program_dir`) and the key comes back `pending`."""
        module = spec.module_for(key)
        inputs = tuple(t.clone() for t in spec.sample_inputs(key))  # no two inputs share memory
        if len(inputs) != len(spec.input_names):
            raise RuntimeError(f"engine {spec.name}: {len(inputs)} sample inputs for {len(spec.input_names)} names")
        attention = stage_attention(self.attention, spec.name, device)
        files: list[Any] = []
        pending = None
        with attention_backend(attention, device):
            t0 = time.perf_counter()
            ep = export(module, names, weights, inputs, conv_layout)
            _check_no_baked_weights(ep, module, spec.name)
            t1 = time.perf_counter()
            if self.pool is not None and program_dir is not None and self.pool.admit((*weights, *inputs)):
                pending = self.pool.submit(ep, (*weights, *inputs), self.compiler.path, attention, program_dir)
            else:
                files = compile_program(ep, (*weights, *inputs), self.compiler.path)
            t2 = time.perf_counter()
        outs = _output_specs(ep)
        if len(outs) != len(spec.output_names):
            raise RuntimeError(f"engine {spec.name}: {len(outs)} outputs for {len(spec.output_names)} names")
        return CompiledKey(
            files,
            [([int(s) for s in t.shape], dtype_name(t.dtype)) for t in inputs],
            outs,
            t1 - t0,
            t2 - t1,
            _constant_bytes(ep),
            pending,
        )

    def weight_plan(
        self, spec: EngineSpec, conv_layout: str = "ncdhw"
    ) -> tuple[list[str], list[str], dict[str, torch.Tensor]]:
        """(engine input names of the weights, their names in the weights file, file tensors by name, in the file
        layout `conv_layout`)."""
        first = spec.shape_keys[0]
        if spec.per_layer:
            inner = list(module_tensors(spec.per_layer[0]))
            input_names = [f"block.{n}" for n in inner]
            file_tensors = {
                LAYER_PREFIX.format(i) + n: t
                for i, layer in enumerate(spec.per_layer)
                for n, t in module_tensors(layer).items()
            }
            for i, layer in enumerate(spec.per_layer):
                if list(module_tensors(layer)) != inner:
                    raise RuntimeError(f"{spec.name}: layer {i} has other tensors than layer 0")
            return input_names, inner, file_tensors
        module = spec.module_for(first)
        used = used_weight_names(module, spec.sample_inputs(first))
        tensors = module_tensors(module)
        return used, used, {n: to_file_layout(tensors[n], conv_layout) for n in used}

    def build(
        self,
        spec: EngineSpec,
        out_dir: Path,
        *,
        precision: str,
        log: Log,
        write_weights: bool = True,
    ) -> StageEntry:
        """Compile every shape key of `spec` into `out_dir/<name>.pt2` and write `out_dir/<name>.safetensors`."""
        return self.start(spec, out_dir, precision=precision, log=log, write_weights=write_weights)()

    def start(
        self,
        spec: EngineSpec,
        out_dir: Path,
        *,
        precision: str,
        log: Log,
        write_weights: bool = True,
    ) -> Finish:
        """`build` in two halves: export every shape key and write the weights file now; package the compiled
        keys when the returned call is made. Without a compile pool the compiles run here, before it returns;
        with one they run in its workers, and the returned call waits for them. What the returned call keeps
        of `spec` is names and metadata, never its tensors."""
        out_dir = Path(out_dir)
        t_start = time.perf_counter()
        module = spec.module_for(spec.shape_keys[0])
        all_tensors = module_tensors(module)
        first = next(iter(all_tensors.values()), None)
        device = first.device if first is not None else torch.device("cpu")
        conv_layout = stage_conv_layout(self.conv_layout, spec.name, device)
        input_names, file_names, file_tensors = self.weight_plan(spec, conv_layout)
        # per-layer engines take the block's tensors as inputs; the others their file tensors, in the file layout
        weights = [all_tensors[n] for n in input_names] if spec.per_layer else [file_tensors[n] for n in input_names]
        attention = stage_attention(self.attention, spec.name, device)
        compiled: dict[str, CompiledKey] = {}
        programs = out_dir / f".{spec.name}.programs"  # saved programs for the pool, removed by `finish`
        # a call-back plugin that ships compiled kernels with its engines (FA4: it compiles them in Python at first
        # call) learns from the export which shapes the op is called with, then compiles and exports them
        plugin = CALLBACK_ATTENTION.get(attention)  # CUDA only (stage_attention)
        ships = plugin is not None and hasattr(plugin, "save_kernels")
        with plugin.traced_shapes() if ships else contextlib.nullcontext(set()) as op_shapes:
            for key in spec.shape_keys:
                log(f"{spec.name} [{key}]: export + AOTInductor compile ({len(weights)} weight inputs)")
                compiled[key] = c = self.compile_key(spec, key, input_names, weights, device, conv_layout, programs)
                if c.pending is not None:
                    log(f"{spec.name} [{key}]: export {c.export_s:.1f} s, compile handed to a worker")
                else:
                    why = f" ({self.pool.refusal})" if self.pool is not None and self.pool.refusal else ""
                    log(f"{spec.name} [{key}]: export {c.export_s:.1f} s, compile {c.compile_s:.1f} s{why}")
        kernels = plugin.save_kernels(out_dir, spec.name, op_shapes, device) if ships else []
        if kernels:
            log(f"{spec.name}: {len(kernels)} {plugin.NAME} kernels compiled and exported")
        weights_file = out_dir / f"{spec.name}{WEIGHTS_SUFFIX}"
        if write_weights:
            save_weights(weights_file, file_tensors, {"format": "pt", "engine": spec.name})
        if len(weights) != len(file_names):
            raise RuntimeError(f"engine {spec.name}: {len(weights)} weight inputs for {len(file_names)} file names")
        name, input_names_, output_names = spec.name, list(spec.input_names), list(spec.output_names)
        layer_fields = per_layer_fields(spec)
        extra: dict[str, Any] = {
            "device": device.type,
            "attention": attention,
            **(plugin.describe() if plugin is not None else {}),
            **({"attention_kernels": len(kernels)} if ships else {}),
            "conv_layout": conv_layout,
            "weight_dtypes": sorted({dtype_name(t.dtype) for t in file_tensors.values()}),
            "weights_bytes": sum(t.numel() * t.element_size() for t in file_tensors.values()),
            "torch": torch.__version__,
            "cxx": self.compiler.version or self.compiler.path,
            **({"notes": spec.notes} if spec.notes else {}),
        }
        own_s = time.perf_counter() - t_start  # this process's share so far; a worker's compile is added below

        def finish() -> StageEntry:
            from torch._inductor.package import package_aoti

            nonlocal own_s
            t_finish, waited = time.perf_counter(), 0.0
            packages: dict[str, Path] = {}
            for key, c in list(compiled.items()):
                if c.pending is not None:
                    t_wait = time.perf_counter()
                    try:
                        files, seconds = c.pending.result()
                    except Exception as e:
                        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise RuntimeError(f"engine {name} [{key}]: the compile worker failed: {why}") from e
                    waited += time.perf_counter() - t_wait
                    compiled[key] = c = replace(c, files=files, compile_s=seconds, pending=None)
                    log(f"{name} [{key}]: compile {seconds:.1f} s (worker)")
                    own_s += seconds
                packages[key] = out_dir / package_name(name, key)
                package_aoti(str(packages[key]), c.files)  # one model ("model") per package
            shutil.rmtree(programs, ignore_errors=True)
            build_s = own_s + time.perf_counter() - t_finish - waited

            def tensor_specs(names: Sequence[str], which: str) -> list[TensorSpec]:
                specs = []
                for i, tensor in enumerate(names):
                    per_key = {k: getattr(c, which)[i] for k, c in compiled.items()}
                    dtypes = {d for _, d in per_key.values()}
                    if len(dtypes) != 1:
                        raise RuntimeError(f"engine {name}: {which} '{tensor}' changes dtype across shape keys")
                    specs.append(TensorSpec(tensor, dtypes.pop(), {k: s for k, (s, _) in per_key.items()}))
                return specs

            files = [p.name for p in packages.values()] + kernels
            package = packages[next(iter(compiled))]
            return StageEntry(
                name=name,
                backend=self.name,
                file=package.name,
                sha256=sha256_file(package),
                precision=precision,
                inputs=tensor_specs(input_names_, "input_shapes"),
                outputs=tensor_specs(output_names, "output_shapes"),
                weights=weights_file.name if write_weights else None,
                weights_sha256=sha256_file(weights_file) if write_weights else None,
                extra={
                    **extra,
                    "models": {k: p.name for k, p in packages.items()},
                    "code_bytes": sum(p.stat().st_size for p in packages.values()),
                    "constants_bytes": max(c.constants_bytes for c in compiled.values()),
                    "build_seconds": round(build_s, 2),
                    "export_seconds": {k: round(c.export_s, 2) for k, c in compiled.items()},
                    "compile_seconds": {k: round(c.compile_s, 2) for k, c in compiled.items()},
                    **({"compile_jobs": self.pool.jobs} if self.pool is not None else {}),
                },
                files={f: sha256_file(out_dir / f) for f in files},
                weight_names=file_names,
                **layer_fields,
            )

        return finish

    def close(self) -> None:
        """Stop the compile pool's workers, if any (the build loop calls it once, also on failure)."""
        if self.pool is not None:
            self.pool.close()

    def rebind(self, spec: EngineSpec, out_dir: Path, entry: StageEntry) -> StageEntry:
        """Keep `entry`'s compiled package (already in `out_dir`) and write the weights of `spec`'s (new)
        checkpoint under the same names: the code depends on the architecture only."""
        names = entry.weight_names
        tensors = weight_file_tensors(spec, names, entry.extra.get("conv_layout", "ncdhw"))
        weights_file = Path(out_dir) / f"{spec.name}{WEIGHTS_SUFFIX}"
        save_weights(weights_file, tensors, {"format": "pt", "engine": spec.name})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return replace(
            entry,
            weights=weights_file.name,
            weights_sha256=sha256_file(weights_file),
            extra={**entry.extra, "weights_bytes": nbytes},
            **per_layer_fields(spec),
        )


def weight_file_tensors(spec: EngineSpec, names: Sequence[str], conv_layout: str = "ncdhw") -> dict[str, torch.Tensor]:
    """The weights-file tensors of `spec` for weight names `names` (an earlier build's, see `weight_plan`), as
    views of the module's own tensors (no copy; 5-D tensors copied into the engine's `conv_layout`); `layers.{i}.`
    prefixed per layer for the DiT block."""
    if spec.per_layer:
        out = {}
        for i, layer in enumerate(spec.per_layer):
            tensors = module_tensors(layer)
            out.update({LAYER_PREFIX.format(i) + n: tensors[n] for n in names})
        return out
    tensors = module_tensors(spec.module_for(spec.shape_keys[0]))
    return {n: to_file_layout(tensors[n], conv_layout) for n in names}


def configure(name: str, options: BackendOptions) -> TorchAOTBackend:
    """The `torch-aot` backend with the request's options (`fvrt.builder.backends.configure`); OptionError (one
    line) for a value it refuses."""
    if name != TorchAOTBackend.name:
        raise ValueError(f"fvrt.builder.backends.aoti serves 'torch-aot', not '{name}'")
    check_attention(name, ATTENTION_CHOICES, options.attention)
    if options.conv_layout not in CONV_LAYOUT_CHOICES:
        raise OptionError(f"--conv-layout: choose one of {', '.join(CONV_LAYOUT_CHOICES)}, got '{options.conv_layout}'")
    if options.attention in fp8_attention.MODES and not (
        options.device.type == "cuda" and fp8_attention.supported(options.device)
    ):  # the DiT's attention in FP8: a Triton kernel compiled for the local GPU
        raise OptionError(
            f"--attention {options.attention}: FP8 attention compiles a Triton kernel for the local GPU and needs "
            "--device cuda with compute capability 8.9 or newer and Triton installed"
        )
    plugin = CALLBACK_ATTENTION.get(options.attention)
    if plugin is not None and (why := plugin.supported(options.device)):
        raise OptionError(f"--attention {options.attention}: {why}")
    if options.jobs < 1:
        raise OptionError(f"--jobs: at least 1 compile process, got {options.jobs}")
    backend = TorchAOTBackend(options.attention, options.cxx, options.conv_layout)
    backend.device = options.device
    backend.pool = CompilePool(options.jobs) if options.jobs > 1 else None
    return backend
