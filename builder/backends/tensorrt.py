"""TensorRT-family backends: `tensorrt` (full TensorRT >= 10.14) and `tensorrt-rtx` (TensorRT-RTX >= 1.7).

One builder for both Python modules (`tensorrt`, `tensorrt_rtx`); they share the builder/network/parser API and
differ only where `_configure_targets` branches. Per engine and shape key:
    EngineSpec --onnx_export--> opset-23 ONNX (static shapes, precision in the graph)
               --OnnxParser--> strongly typed network (ONNX `Attention` -> IAttention)
               --one optimization profile, min = opt = max--> serialized plan.

Where the two flavours differ (see docs/tensorrt.md):
- TensorRT-RTX compiles ahead of time for a list of compute capabilities (`target_ccs`) with no GPU present
  (`IBuilderConfig.set_compute_capability`); the plan is JIT-specialised on the user's GPU at load time. Its
  1.7 enum has SM75/80/86/89/120/121 only: no Hopper (9.0), no datacenter Blackwell (10.x).
- Full TensorRT builds on, and for, the GPU it runs on (`hardware_compatibility_level = NONE`); the manifest
  records that GPU's compute capability. It cannot be installed on our machines (no wheel on PyPI), so this
  path is the same code with these two branches and has not been executed here.
Precision is never a builder flag (TensorRT-RTX and TensorRT 11 have none): the network is strongly typed and
takes every dtype from the ONNX graph.

Attention: each ONNX `Attention` node becomes an IAttention, which by default must map to a fused kernel or the
build fails. Fused kernels exist for fp16/bf16 with head_dim >= 16 (measured on TensorRT-RTX 1.7: 16..256 build,
8 does not) and never for fp32, so fp32 graphs always mark attention decomposable (TensorRT then lowers it to
MatMul-Softmax-MatMul), and so does any graph whose head size is below 16 (the tiny models: the build log says
so); other bf16 graphs do so only with `attention="decomposable"` (`fvrt-build --attention`). The choice is
recorded per engine.
"""

from __future__ import annotations

import importlib
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fvrt.builder.backends import onnx_export as OX
from fvrt.builder.backends.base import BackendOptions, Finish, OptionError, check_attention, per_layer_fields
from fvrt.builder.stages.base import EngineSpec
from fvrt.runtime.manifest import StageEntry, TensorSpec, sha256_file
from fvrt.runtime.precision import QUANTIZED

Log = Callable[[str], None]

FLAVOR_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PLAN_SUFFIX = {"tensorrt": ".engine", "tensorrt-rtx": ".plan"}  # the two runtimes cannot load each other's plans
MIN_VERSION = {"tensorrt": (10, 14), "tensorrt-rtx": (1, 7)}  # 10.14: first TensorRT with IAttention / ONNX Attention
INSTALL_HINT = {
    "tensorrt": "full TensorRT has no installable wheel on PyPI; install it from NVIDIA on the GPU machine",
    "tensorrt-rtx": "pip install 'fvrt[trt]' (tensorrt-rtx==1.7.1.116)",
}
# TensorRT-RTX 1.7 `ComputeCapability` members (measured: NONE, CURRENT, SM75 ... SM121; CURRENT needs a GPU)
RTX_COMPUTE_CAPABILITIES = {
    "7.5": "SM75",
    "8.0": "SM80",
    "8.6": "SM86",
    "8.9": "SM89",
    "12.0": "SM120",
    "12.1": "SM121",
}
DEFAULT_TARGET_CCS = ("8.9", "12.0")  # Ada (RTX 4090 / L40) and consumer / RTX PRO Blackwell
WEIGHTS_SUFFIX = ".weights.safetensors"
ATTENTION_MODES = ("default", "decomposable")  # see the module docstring
# The smallest attention head size with a fused kernel (measured on TensorRT-RTX 1.7: 16..256 build, 8 does not);
# below it attention is always marked decomposable, whatever --attention says (the tiny models' head size is 8)
FUSED_MIN_HEAD_DIM = 16
NO_FUSED_KERNEL = "Attention operation was not supported by a dedicated kernel"  # TensorRT's build error text
PRECISION_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
}


class TensorRTBuildError(RuntimeError):
    """Parsing or building one engine failed; the message names the engine, the shape key and TensorRT's error."""


def parse_compute_capabilities(values: str | Iterable[str]) -> tuple[str, ...]:
    """Parse "8.9,12.0" / ["SM89", "sm_120", "89"] -> ("8.9", "12.0"); ValueError (one line) for an unknown one."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out: list[str] = []
    for raw in items:
        s = raw.strip().lower().removeprefix("sm").lstrip("_")
        m = re.fullmatch(r"(\d+)\.(\d)|(\d+)(\d)", s)
        if m is None:
            raise ValueError(f"--target-cc: cannot read compute capability '{raw}' (use e.g. 8.9 or SM89)")
        cc = f"{m.group(1)}.{m.group(2)}" if m.group(1) else f"{m.group(3)}.{m.group(4)}"
        if cc not in RTX_COMPUTE_CAPABILITIES:
            raise ValueError(
                f"--target-cc: TensorRT-RTX cannot target compute capability {cc}; "
                f"choose from {', '.join(RTX_COMPUTE_CAPABILITIES)}"
            )
        if cc not in out:
            out.append(cc)
    if not out:
        raise ValueError("--target-cc: no compute capability given")
    return tuple(out)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


@dataclass
class PlanResult:
    """One built plan: bytes and what the build decided."""

    plan: bytes
    attention_layers: int
    attention_decomposable: bool
    seconds: float


# TensorRT warnings that every build of these graphs prints and that need no action: int64 I/O is supported
# (timestep indices), and `dit_out` ignores its `*_embedded` inputs in LTX-2.3 (they stay declared engine inputs).
BENIGN_WARNINGS = re.compile(
    r"Make sure (input|output) \S+ has Int64 binding|Unused Input: |\[RemoveDeadLayers\] Input"
)


class _Logger:
    """A TensorRT `ILogger` that keeps errors for the exception message and forwards warnings to `log`."""

    def __new__(cls, trt: ModuleType, log: Log | None) -> Any:
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(msg.strip())
                elif severity == trt.ILogger.Severity.WARNING and log is not None and not BENIGN_WARNINGS.search(msg):
                    log(f"TensorRT: {msg.strip()}")

        return Logger()


@dataclass
class TensorRTBackend:
    """`fvrt.builder.backends` interface for `tensorrt` and `tensorrt-rtx` (see the module docstring).

    target_ccs: TensorRT-RTX compute capabilities to compile for (ignored by full TensorRT, which targets its
        build GPU). attention: "default" = bf16/fp16 attention must map to a fused kernel (the build fails
        otherwise); "decomposable" = TensorRT may lower it to MatMul-Softmax-MatMul (fp32 always does).
        onnx_dir: keep the exported ONNX files there (default: a scratch folder inside the build directory,
        removed after each engine).
    """

    name: str
    target_ccs: tuple[str, ...] = DEFAULT_TARGET_CCS
    attention: str = "default"
    onnx_dir: Path | None = None
    _trt: ModuleType | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name not in FLAVOR_MODULES:
            raise ValueError(f"unknown TensorRT flavour '{self.name}'; choose one of: {', '.join(FLAVOR_MODULES)}")
        self.target_ccs = parse_compute_capabilities(self.target_ccs)
        self._check_attention()

    def _check_attention(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"--attention {self.attention}: TensorRT backends take one of {', '.join(ATTENTION_MODES)}"
            )

    # ----------------------------------------------------------------------------------------------------------
    # the library

    @property
    def module_name(self) -> str:
        return FLAVOR_MODULES[self.name]

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    def trt(self) -> ModuleType:
        """The imported `tensorrt` / `tensorrt_rtx` module (ImportError when absent)."""
        if self._trt is None:
            self._trt = importlib.import_module(self.module_name)
        return self._trt

    def available(self) -> str | None:
        """None when this backend can build here, else the one-line reason."""
        try:
            trt = self.trt()
        except ImportError as e:
            other = next(n for n in FLAVOR_MODULES if n != self.name)
            try:
                importlib.import_module(FLAVOR_MODULES[other])
                alt = f"; '{other}' is installed: use --backend {other}"
            except ImportError:
                alt = ""
            return f"Python module '{self.module_name}' cannot be imported ({e}); {INSTALL_HINT[self.name]}{alt}"
        need = MIN_VERSION[self.name]
        if _version_tuple(trt.__version__) < need:
            need_s = ".".join(map(str, need))
            return f"{self.module_name} {trt.__version__} is too old, need >= {need_s}"
        if not self.is_rtx and not torch.cuda.is_available():
            return "full TensorRT builds on a CUDA GPU and this machine has none (tensorrt-rtx builds on CPU)"
        return None

    def version(self) -> str:
        return str(self.trt().__version__)

    # ----------------------------------------------------------------------------------------------------------
    # the build loop's protocol (fvrt.builder.backends.base.Backend)

    attention_choices = ATTENTION_MODES
    rebinds = False  # plans embed their weights (all but the per-layer ones): a new checkpoint is a new build
    errors = (TensorRTBuildError,)  # TensorRT refused a graph: bad input, not an internal bug

    def refuse_precision(self, precision: str) -> str | None:
        if self.is_rtx and precision == "nvfp4" and any(float(cc) < 12.0 for cc in self.target_ccs):
            return (
                f"--precision nvfp4: TensorRT-RTX builds FP4 for compute capability 12.0 (Blackwell GeForce) only, "
                f"got --target-cc {','.join(self.target_ccs)}; pass --target-cc 12.0"
            )
        return None

    def recipe(self) -> dict[str, Any]:
        """The plans depend on the library version and the target GPUs."""
        return {"tensorrt": self.version(), "compute_capabilities": list(self.compute_capabilities())}

    def environment(self) -> dict[str, str | None]:
        """RTX: the AOT target list; full TensorRT: the build GPU."""
        return {"tensorrt_version": self.version(), "compute_capability": ",".join(self.compute_capabilities())}

    def engine_recipe(self, name: str) -> dict[str, Any]:
        return {}  # every engine of a build is configured alike

    def rebind(self, spec: EngineSpec, out_dir: Path, entry: StageEntry) -> StageEntry:
        raise NotImplementedError(f"{self.name}: plans embed their weights; a new checkpoint is built anew")

    def start(self, spec: EngineSpec, out_dir: Path, *, precision: str, log: Log) -> Finish:
        """The whole build, in this process (TensorRT's builder parallelises inside one plan)."""
        entry = self.build(spec, out_dir, precision=precision, log=log)
        return lambda: entry

    def close(self) -> None:
        """Nothing runs outside this process."""

    def compute_capabilities(self) -> list[str]:
        """What the plans can run on: the RTX target list, or the build GPU's compute capability."""
        if self.is_rtx:
            return list(self.target_ccs)
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}"]

    # ----------------------------------------------------------------------------------------------------------
    # one plan

    def _configure_targets(self, trt: ModuleType, config: Any) -> None:
        """The flavour-specific part of the builder config."""
        if self.is_rtx:
            # CPU-only ahead-of-time compilation for the listed GPUs; kernels are specialised at load (JIT).
            # No timing cache: it would make the AOT step query a GPU (TensorRT-RTX 1.3 release notes).
            config.num_compute_capabilities = len(self.target_ccs)
            for i, cc in enumerate(self.target_ccs):
                config.set_compute_capability(getattr(trt.ComputeCapability, RTX_COMPUTE_CAPABILITIES[cc]), i)
        else:
            # full TensorRT autotunes on the build GPU; the plan runs on GPUs of that compute capability only
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE

    def build_plan(self, onnx_path: Path, *, precision: str, what: str, log: Log | None = None) -> PlanResult:
        """Parse `onnx_path` into a strongly typed network and build one static-shape plan."""
        trt = self.trt()
        t0 = time.perf_counter()
        logger = _Logger(trt, log)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTBuildError(f"{what}: the {self.module_name} ONNX parser refused the graph: {errs}")

        decomposable = precision == "fp32" or self.attention == "decomposable"
        n_attention, small_heads = 0, set()
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.ATTENTION_OUTPUT:
                layer.__class__ = trt.IAttentionOutputLayer  # the Python API hands out the ILayer base class
                head = int(layer.attention.get_input(0).shape[-1])  # query [B, H, T, head size], static
                if not decomposable and head < FUSED_MIN_HEAD_DIM:
                    small_heads.add(head)  # no fused kernel exists: decompose it rather than fail the build
                layer.attention.decomposable = decomposable or head < FUSED_MIN_HEAD_DIM
                n_attention += 1
        if small_heads and log is not None:
            sizes = ", ".join(map(str, sorted(small_heads)))
            which = "head size {} is" if len(small_heads) == 1 else "head sizes {} are"
            log(
                f"{what}: attention {which.format(sizes)} below the fused kernels' minimum ({FUSED_MIN_HEAD_DIM}): "
                "that attention is decomposed into MatMul-Softmax-MatMul"
            )

        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = tuple(t.shape)
            if any(d < 0 for d in shape):
                raise TensorRTBuildError(f"{what}: input {t.name} has a dynamic shape {shape}; engines are static")
            profile.set_shape(t.name, shape, shape, shape)  # static per shape key: min = opt = max
        config.add_optimization_profile(profile)
        self._configure_targets(trt, config)

        plan = builder.build_serialized_network(network, config)
        if plan is None:
            if any(NO_FUSED_KERNEL in e for e in logger.errors):
                raise TensorRTBuildError(
                    f"{what}: {self.module_name} has no fused attention kernel for this graph's {precision} "
                    "attention (fused kernels need fp16/bf16 and head_dim >= 16); build with --attention "
                    "decomposable to let TensorRT decompose it"
                )
            errs = "; ".join(logger.errors[-3:]) or "no error message"
            raise TensorRTBuildError(f"{what}: {self.module_name} build failed: {errs}")
        decomposed = (decomposable or bool(small_heads)) and n_attention > 0
        return PlanResult(bytes(plan), n_attention, decomposed, time.perf_counter() - t0)

    # ----------------------------------------------------------------------------------------------------------
    # one engine

    def build(
        self,
        spec: EngineSpec,
        out_dir: str | Path,
        *,
        precision: str | torch.dtype,
        log: Log | None = None,
    ) -> StageEntry:
        """Export and build every shape key of `spec` into `out_dir`; per-layer engines (the DiT block) also
        get `<name>.weights.safetensors` holding `layers.{i}.<param>` for the runtime to bind per call."""
        reason = self.available()
        if reason is not None:
            raise RuntimeError(reason)
        self._check_attention()
        t_start = time.perf_counter()
        # FP8Linear layers export as QuantizeLinear / DequantizeLinear pairs, NVFP4Linear as ModelOpt's NVFP4 form
        # (trt::TRT_FP4DynamicQuantize + DequantizeLinear chains, FLOAT4E2M1 weights)
        quantized = precision in QUANTIZED
        want = OX.module_precision(spec.module) if quantized else _precision_name(precision)
        have = OX.module_precision(spec.module)
        if have != want:
            raise ValueError(
                f"engine {spec.name}: --precision {want} but the loaded weights are {have}; TensorRT takes "
                "precision from the graph, so load the checkpoint in the precision to build"
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        scratch = self.onnx_dir or out / f".onnx-{spec.name}"
        files: dict[str, dict[str, Any]] = {}
        inputs: dict[str, TensorSpec] = {}
        outputs: dict[str, TensorSpec] = {}
        weight_inputs: list[dict[str, Any]] = []
        attention: dict[str, Any] = {}
        graph_notes: dict[str, Any] = {}
        try:
            for key in spec.shape_keys:
                what = f"{spec.name}[{key}]"
                t0 = time.perf_counter()
                graph = OX.export_onnx(spec, key, scratch / f"{spec.name}.{_key_file(key)}.onnx", log=log)
                export_s = time.perf_counter() - t0
                if quantized and not QDQ_OPS[precision] <= set(graph.op_types):
                    raise ValueError(f"{what}: --precision {precision} but the exported graph has no {precision} Q/DQ")
                built = self.build_plan(graph.path, precision=want, what=what, log=log)
                plan_file = f"{spec.name}.{_key_file(key)}{PLAN_SUFFIX[self.name]}"
                (out / plan_file).write_bytes(built.plan)
                files[key] = {
                    "file": plan_file,
                    "sha256": sha256_file(out / plan_file),
                    "bytes": len(built.plan),
                    "export_seconds": round(export_s, 2),
                    "build_seconds": round(built.seconds, 2),
                }
                if log is not None:
                    log(
                        f"{what}: {self.name} plan {len(built.plan):,} B "
                        f"(export {export_s:.1f} s, build {built.seconds:.1f} s)"
                    )
                weight_set = set(graph.weight_inputs)
                for t in graph.inputs:
                    if t.name in weight_set:
                        if key == spec.shape_keys[0]:
                            weight_inputs.append({"name": t.name, "dtype": t.dtype, "shape": t.shape})
                        continue
                    _add_shape(inputs, t, key)
                for t in graph.outputs:
                    _add_shape(outputs, t, key)
                attention = {"layers": built.attention_layers, "decomposable": built.attention_decomposable}
                graph_notes = {"op_types": graph.op_types, "fp32_islands": graph.fp32_islands}
                if self.onnx_dir is None:
                    for p in scratch.glob(f"{spec.name}.{_key_file(key)}.onnx*"):
                        p.unlink()
        finally:
            if self.onnx_dir is None:
                shutil.rmtree(scratch, ignore_errors=True)

        weights = weights_sha = None
        weights_bytes = 0
        if spec.per_layer:
            weights = f"{spec.name}{WEIGHTS_SUFFIX}"
            write_per_layer_weights(spec, out / weights, [w["name"] for w in weight_inputs])
            weights_sha = sha256_file(out / weights)
            weights_bytes = (out / weights).stat().st_size
        first = files[spec.shape_keys[0]]
        extra: dict[str, Any] = {
            "files": files,
            "build_seconds": round(time.perf_counter() - t_start, 2),
            "code_bytes": sum(f["bytes"] for f in files.values()),  # plans embed the weights except per-layer
            "weights_bytes": weights_bytes,
            "tensorrt_module": self.module_name,
            "tensorrt_version": self.version(),
            "compute_capabilities": self.compute_capabilities(),
            "onnx_opset": OX.OPSET,
            "attention": attention,
            **graph_notes,
            **({"notes": spec.notes} if spec.notes else {}),
        }
        if spec.per_layer:
            extra["weight_inputs"] = weight_inputs  # with their dtypes and shapes
        return StageEntry(
            name=spec.name,
            backend=self.name,
            file=first["file"],
            sha256=first["sha256"],
            precision=precision if quantized else want,
            inputs=list(inputs.values()),
            outputs=list(outputs.values()),
            weights=weights,
            weights_sha256=weights_sha,
            extra=extra,
            files={f["file"]: f["sha256"] for f in files.values()},  # every plan, verified by the runtime
            weight_names=[w["name"] for w in weight_inputs],
            **per_layer_fields(spec),
        )


def _precision_name(precision: str | torch.dtype) -> str:
    if isinstance(precision, torch.dtype):
        if precision not in OX.PRECISIONS:
            raise ValueError(f"--precision: unsupported dtype {precision}")
        return OX.PRECISIONS[precision]
    if precision not in PRECISION_ALIASES:
        raise ValueError(f"--precision: unknown precision '{precision}'; choose fp32 or bf16")
    return PRECISION_ALIASES[precision]


def _key_file(key: str) -> str:
    """Shape key -> file-name part ("1080p/s1" -> "1080p-s1")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def _add_shape(table: dict[str, TensorSpec], t: OX.TensorInfo, key: str) -> None:
    if t.name not in table:
        table[t.name] = TensorSpec(t.name, t.dtype, {})
    elif table[t.name].dtype != t.dtype:
        raise TensorRTBuildError(f"tensor {t.name}: dtype {t.dtype} at {key} differs from {table[t.name].dtype}")
    table[t.name].shapes[key] = list(t.shape)


QDQ_OPS = {
    "fp8": {"QuantizeLinear", "DequantizeLinear"},
    "nvfp4": {"TRT_FP4DynamicQuantize", "DequantizeLinear"},
}
"""The ops a quantised engine's graph must hold."""


def write_per_layer_weights(spec: EngineSpec, path: Path, names: Sequence[str]) -> None:
    """Save `layers.{i}.<name>` for every per-layer module of `spec` and every weight input name."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    wanted = set(names)
    for i, layer in enumerate(spec.per_layer):
        params = dict(layer.named_parameters())
        missing = wanted - params.keys()
        if missing:
            raise TensorRTBuildError(f"{spec.name}: layer {i} lacks weights {sorted(missing)[:3]}")
        for n in names:
            tensors[f"layers.{i}.{n}"] = params[n].detach().contiguous().cpu()
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"engine": spec.name, "layers": str(len(spec.per_layer))})
    tmp.replace(path)


def configure(name: str, options: BackendOptions) -> TensorRTBackend:
    """The backend for `name` with the request's options (`fvrt.builder.backends.configure`); OptionError (one
    line) for a value it refuses."""
    check_attention(name, ATTENTION_MODES, options.attention)
    kwargs: dict[str, Any] = {"attention": options.attention}
    if options.target_ccs:
        try:
            kwargs["target_ccs"] = parse_compute_capabilities(
                [cc for value in options.target_ccs for cc in value.split(",") if cc.strip()]
            )
        except ValueError as e:
            raise OptionError(" ".join(str(e).split())) from None
    return TensorRTBackend(name, **kwargs)


def backend(name: str, **options: Any) -> TensorRTBackend:
    """The backend object for `name` ("tensorrt" | "tensorrt-rtx"); options: see `TensorRTBackend`."""
    return TensorRTBackend(name, **options)
