"""Build an engine directory: checkpoint (or random model) -> engines/<id>/ with `manifest.json`.

`build_engines(BuildRequest(...))` is the one library call behind `fvrt-build` and `make engines`:

1. validate the request (profiles, backend and its library, device, files, output directory) before any
   loading, each failure a one-line `BuildError`;
2. compute the build key, sha256 of the canonical recipe + checkpoint hash + tool versions; an existing engine
   directory with the same key is up to date and nothing is rebuilt; otherwise each stage whose own key is
   unchanged is reused from it (its files copied), and for torch-aot a stage whose code key is unchanged but
   whose weights changed only gets a new weights file (one build serves every checkpoint of an architecture);
3. build into a temporary sibling directory and rename it into place at the end; on any failure (disk full
   included) the temporary directory is removed and the previous engine directory is left as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import fvrt
from fvrt.builder.backends import BACKEND_MODULES, get_backend
from fvrt.builder.backends.aoti import CONV_LAYOUT_CHOICES, stage_conv_layout
from fvrt.builder.checkpoint import LTXCheckpoint, ModelVersion, load_checkpoint
from fvrt.builder.engines import PRESET_PROFILES, EngineSpec, Profile, engine_specs, is_block_engine
from fvrt.builder.random_release import (
    SIZES,
    full_random_checkpoint,
    load_tiny_release,
    random_identity,
    write_tiny_release,
)
from fvrt.plugins import fp8_attention
from fvrt.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BuildEnv,
    EngineError,
    Manifest,
    StageEntry,
    chunk_digests,
    manifest_files,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)
from fvrt.runtime.precision import PRECISIONS as PRECISION_TABLE
from fvrt.runtime.precision import QUANTIZED, TEXT_PRECISIONS

logger = logging.getLogger(__name__)

ENGINE_NAMES = (
    "text_in",
    "text_block",
    "text_out",
    "dit_prep",
    "dit_in",
    "dit_block",
    "dit_out",
    "video_encoder",
    "upsampler",
    "video_decoder",
    "audio_decoder",
)
STAGE_GROUPS = {
    "text_encoder": ("text_in", "text_block", "text_out"),
    "dit": ("dit_prep", "dit_in", "dit_block", "dit_out"),
}
TEXT_ENGINES = STAGE_GROUPS["text_encoder"]
ATTENTION_CHOICES = ("default", "cudnn", *fp8_attention.MODES)  # torch-aot on CUDA: baked into the exported graphs
# TensorRT-family backends (builder/backends/tensorrt.py): they take --attention default|decomposable (that
# module's ATTENTION_MODES); only TensorRT-RTX takes --target-cc (full TensorRT builds for the GPU it runs on).
TENSORRT_BACKENDS = ("tensorrt", "tensorrt-rtx")
TARGET_CC_BACKENDS = ("tensorrt-rtx",)
# --precision (runtime/precision.py): the torch dtype of the engines; QUANTIZED ones quantise the DiT Linears after
# calibration and keep every other tensor in that dtype
PRECISIONS = {name: getattr(torch, p.dtype) for name, p in PRECISION_TABLE.items()}
DEFAULT_CALIB_PROMPTS = Path("calib_data/prompts.txt")  # relative to the working directory (the repo root)
CALIB_METHODS = ("modelopt", "hooks")  # hooks: the same max statistic without ModelOpt (tests/test_quant.py)
DEVICES = ("cpu", "cuda")
# Tokenizer files copied from the Gemma folder into <engine dir>/tokenizer/ (the runtime tokenizes prompts).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
TOKENIZER_DIR = "tokenizer"
BUILD_LOG = "build.log"
ENGINE_DIR_MODE = 0o755
_PROFILE_RE = re.compile(r"^(?:(?P<name>[A-Za-z0-9_.-]+)=)?(?P<h>\d+)x(?P<w>\d+)x(?P<f>\d+)(?:@(?P<fps>[\d.]+))?$")

Log = Callable[[str], None]


class BuildError(ValueError):
    """A build request that cannot be served; the message is one line naming the flag or file and the rule."""


@dataclass(frozen=True)
class BuildRequest:
    """What to build. Exactly one of `checkpoint` / `random` ("tiny" | "full")."""

    out_dir: Path
    checkpoint: Path | None = None
    upsampler: Path | None = None
    gemma: Path | None = None
    random: str | None = None
    version: str = "2.3"  # random builds only; a checkpoint says its own version
    profiles: tuple[str, ...] = ()  # preset names or HxWxF[@fps]; default "tiny" (random tiny) else "1080p"
    backend: str = "torch-aot"
    precision: str = "fp32"
    device: str = "cpu"
    stages: tuple[str, ...] = ()  # engine names or groups ("dit"); default every engine
    force: bool = False
    seed: int = 0
    attention: str = "default"  # torch-aot: "default" | "cudnn"; TensorRT: "default" | "decomposable"
    target_ccs: tuple[str, ...] = ()  # tensorrt-rtx: compute capabilities ("8.9", "12.0,8.6"); default its own
    cxx: str | None = None  # torch-aot: C++ compiler of the wrapper (default: $FVRT_CXX or the first that works)
    calib_prompts: Path | None = None  # fp8 / nvfp4: prompts file (default calib_data/prompts.txt)
    calib_count: int = 8  # fp8 / nvfp4: pipeline runs (prompts spread over the file)
    calib_images: Path | None = None  # fp8 / nvfp4: conditioning images folder (default: beside the prompts)
    # fp8 / nvfp4, programmatic only: `LTXDiT.forward` keyword inputs recorded elsewhere (e.g. by scripts/bench.py
    # from the bf16 engines' own pipeline run), used instead of running the eager pipeline over the prompts
    calib_inputs: tuple[dict[str, torch.Tensor], ...] | None = field(default=None, compare=False, repr=False)
    calib_method: str = "modelopt"  # fp8 / nvfp4: CALIB_METHODS
    text_precision: str = "bf16"  # "fp8": the Gemma decoder layers in FP8 (text_block), calibrated on the prompts
    verify: bool = False  # torch-aot: run each new engine against eager on fresh inputs; errors go in the manifest
    conv_layout: str = "auto"  # torch-aot: the video VAE engines' 3-D conv weight layout (aoti.CONV_LAYOUT_CHOICES)


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    up_to_date: bool
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    rebound: list[str] = field(default_factory=list)  # code reused, new weights file written


# --------------------------------------------------------------------------------------------------------------
# validation


def parse_profile(text: str) -> Profile:
    """A preset name ("1080p", "tiny", ...) or `[name=]HxWxF[@fps]` (e.g. 1088x1920x121@24)."""
    if text in PRESET_PROFILES:
        return PRESET_PROFILES[text]
    m = _PROFILE_RE.match(text)
    if m is None:
        raise BuildError(
            f"--profile '{text}': not a preset ({', '.join(PRESET_PROFILES)}) nor HEIGHTxWIDTHxFRAMES[@FPS]"
        )
    h, w, f = int(m["h"]), int(m["w"]), int(m["f"])
    fps = float(m["fps"]) if m["fps"] else 24.0
    p = Profile(m["name"] or f"{h}x{w}x{f}", h, w, f, fps)
    try:
        p.validate()
    except ValueError as e:
        raise BuildError(f"--profile '{text}': {e}") from None
    return p


def resolve_stages(names: Sequence[str]) -> list[str]:
    """Engine names in build order; groups expanded; unknown names refused."""
    if not names:
        return list(ENGINE_NAMES)
    wanted: set[str] = set()
    for n in names:
        if n in STAGE_GROUPS:
            wanted.update(STAGE_GROUPS[n])
        elif n in ENGINE_NAMES:
            wanted.add(n)
        else:
            raise BuildError(f"--stages: unknown engine '{n}'; choose from {', '.join((*ENGINE_NAMES, *STAGE_GROUPS))}")
    return [n for n in ENGINE_NAMES if n in wanted]


def _check_file(path: Path | None, flag: str, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise BuildError(f"{flag}: {what} not found: {path}")


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} exists and is not a directory")
    if out.is_dir() and not (out / MANIFEST_NAME).is_file() and any(out.iterdir()) and not force:
        raise BuildError(f"output {out} exists and is not an engine directory (no {MANIFEST_NAME}); use --force")


@dataclass(frozen=True)
class Plan:
    """A validated request."""

    request: BuildRequest
    profiles: list[Profile]
    stages: list[str]
    dtype: torch.dtype
    device: torch.device
    version: ModelVersion | None  # random builds
    backend: Any = None  # the backend object, configured with the request's options (`make_backend`)


def validate(req: BuildRequest) -> Plan:
    """Every check that needs no loading; one-line BuildError on the first failure."""
    if (req.checkpoint is None) == (req.random is None):
        raise BuildError("give exactly one of --checkpoint FILE or --random tiny|full")
    if req.random is not None and req.random not in SIZES:
        raise BuildError(f"--random: choose one of {', '.join(SIZES)}, got '{req.random}'")
    if req.random is not None and (req.upsampler or req.gemma):
        raise BuildError("--upsampler / --gemma go with --checkpoint, not with --random")
    version = None
    if req.random is not None:
        try:
            version = ModelVersion(req.version)
        except ValueError:
            raise BuildError(f"--version: choose 2.0 or 2.3, got '{req.version}'") from None
    if req.verify and req.backend != "torch-aot":
        raise BuildError(f"--verify: only --backend torch-aot engines run on this machine's torch, not {req.backend}")
    if req.precision not in PRECISIONS:
        raise BuildError(f"--precision: choose one of {', '.join(PRECISIONS)}, got '{req.precision}'")
    if req.device not in DEVICES:
        raise BuildError(f"--device: choose one of {', '.join(DEVICES)}, got '{req.device}'")
    if req.device == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda: no CUDA GPU is visible on this machine")
    if req.backend not in BACKEND_MODULES:
        raise BuildError(f"--backend: unknown backend '{req.backend}'; choose one of {', '.join(BACKEND_MODULES)}")
    default_profiles = ("tiny",) if req.random == "tiny" else ("1080p",)
    profiles = [parse_profile(p) for p in (req.profiles or default_profiles)]
    if len({p.name for p in profiles}) != len(profiles):
        raise BuildError(f"--profile: names must be unique, got {', '.join(p.name for p in profiles)}")
    stages = resolve_stages(req.stages)
    if req.calib_method not in CALIB_METHODS:
        raise BuildError(f"--calib-method: choose one of {', '.join(CALIB_METHODS)}, got '{req.calib_method}'")
    if req.precision in QUANTIZED:
        _validate_quantized(req, stages)
    _validate_text_precision(req, stages)
    _check_file(req.checkpoint, "--checkpoint", "checkpoint file")
    _check_file(req.upsampler, "--upsampler", "upsampler file")
    if req.gemma is not None and not Path(req.gemma).is_dir():
        raise BuildError(f"--gemma: Gemma folder not found: {req.gemma}")
    if req.checkpoint is not None:
        if "upsampler" in stages and req.upsampler is None:
            raise BuildError("the upsampler engine needs --upsampler FILE (or leave it out with --stages)")
        if set(TEXT_ENGINES) & set(stages) and req.gemma is None:
            raise BuildError("the text_encoder engine needs --gemma DIR (or leave it out with --stages)")
    _check_out_dir(Path(req.out_dir), req.force)
    be = make_backend(req)
    reason = be.available()
    if reason is not None:
        raise BuildError(f"--backend {req.backend}: {reason}")
    return Plan(req, profiles, stages, PRECISIONS[req.precision], torch.device(req.device), version, be)


def calibration_files(req: BuildRequest) -> tuple[Path, list[Path]]:
    """(prompts file, conditioning images) of a quantised build."""
    prompts = Path(req.calib_prompts) if req.calib_prompts is not None else DEFAULT_CALIB_PROMPTS
    folder = Path(req.calib_images) if req.calib_images is not None else prompts.parent / "images"
    images = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return prompts, images


def _validate_text_precision(req: BuildRequest, stages: Sequence[str]) -> None:
    if req.text_precision not in TEXT_PRECISIONS:
        raise BuildError(f"--text-precision: choose one of {', '.join(TEXT_PRECISIONS)}, got '{req.text_precision}'")
    if req.text_precision == "bf16":
        return
    if req.precision == "fp32":
        raise BuildError(f"--text-precision {req.text_precision} goes with --precision bf16, fp8 or nvfp4, not fp32")
    if "text_block" not in stages:
        raise BuildError(f"--text-precision {req.text_precision} quantises text_block: include it in --stages")
    prompts, _ = calibration_files(req)
    if not prompts.is_file():
        raise BuildError(f"--calib-prompts: calibration prompts file not found: {prompts}")


def _validate_quantized(req: BuildRequest, stages: Sequence[str]) -> None:
    if req.backend == "tensorrt-rtx" and req.precision == "nvfp4":
        try:
            from fvrt.builder.backends.tensorrt import DEFAULT_TARGET_CCS, parse_compute_capabilities

            ccs = parse_compute_capabilities(",".join(req.target_ccs)) if req.target_ccs else DEFAULT_TARGET_CCS
        except (ImportError, ValueError):
            ccs = ()  # make_backend reports the import or the flag in its own words
        if any(float(cc) < 12.0 for cc in ccs):
            raise BuildError(
                f"--precision nvfp4: TensorRT-RTX builds FP4 for compute capability 12.0 (Blackwell GeForce) only, "
                f"got --target-cc {','.join(ccs)}; pass --target-cc 12.0"
            )
    if "dit_block" not in stages:
        raise BuildError(f"--precision {req.precision} quantises the DiT: include the dit_block engine in --stages")
    if req.checkpoint is not None and (req.gemma is None or req.upsampler is None):
        raise BuildError(
            f"--precision {req.precision} calibrates on real pipeline runs: it needs --gemma DIR and --upsampler FILE"
        )
    if req.calib_inputs is not None:
        if not req.calib_inputs:
            raise BuildError("calib_inputs: no recorded DiT passes given")
        return
    prompts, _ = calibration_files(req)
    if not prompts.is_file():
        raise BuildError(f"--calib-prompts: calibration prompts file not found: {prompts}")
    if req.calib_count < 1:
        raise BuildError(f"--calib-count: at least 1, got {req.calib_count}")


def attention_choices(backend: str) -> tuple[str, ...]:
    """The --attention values `backend` accepts (ImportError when its builder module cannot be imported)."""
    if backend in TENSORRT_BACKENDS:
        from fvrt.builder.backends.tensorrt import ATTENTION_MODES

        return tuple(ATTENTION_MODES)
    return ATTENTION_CHOICES


def make_backend(req: BuildRequest) -> Any:
    """The backend object for `req.backend` with the request's --attention and --target-cc; one-line BuildError
    for an option that backend does not take."""
    if req.target_ccs and req.backend not in TARGET_CC_BACKENDS:
        why = " (full TensorRT builds for the GPU it runs on)" if req.backend in TENSORRT_BACKENDS else ""
        raise BuildError(
            f"--target-cc: only --backend {' | '.join(TARGET_CC_BACKENDS)} takes it, not --backend {req.backend}{why}"
        )
    try:
        choices = attention_choices(req.backend)
        be = None if req.backend in TENSORRT_BACKENDS else get_backend(req.backend)
    except ImportError as e:
        raise BuildError(f"--backend {req.backend}: its builder module cannot be imported ({e})") from None
    if req.attention not in choices:
        raise BuildError(
            f"--attention: choose one of {', '.join(choices)} for --backend {req.backend}, got '{req.attention}'"
        )
    if req.cxx is not None and req.backend != "torch-aot":
        raise BuildError(f"--cxx: only --backend torch-aot takes it, not --backend {req.backend}")
    if req.conv_layout != "auto" and req.backend != "torch-aot":
        raise BuildError(f"--conv-layout: only --backend torch-aot takes it, not --backend {req.backend}")
    if req.conv_layout not in CONV_LAYOUT_CHOICES:
        raise BuildError(f"--conv-layout: choose one of {', '.join(CONV_LAYOUT_CHOICES)}, got '{req.conv_layout}'")
    if req.attention in fp8_attention.MODES and not (
        req.device == "cuda" and fp8_attention.supported(torch.device("cuda"))
    ):  # the DiT's attention in FP8: a Triton kernel compiled for the local GPU
        raise BuildError(
            f"--attention {req.attention}: FP8 attention compiles a Triton kernel for the local GPU and needs "
            "--device cuda with compute capability 8.9 or newer and Triton installed"
        )
    if be is not None:
        be.attention = req.attention
        be.cxx = req.cxx
        be.conv_layout = req.conv_layout
        return be
    from fvrt.builder.backends import tensorrt as trt_backend

    options: dict[str, Any] = {"attention": req.attention}
    if req.target_ccs:
        try:
            options["target_ccs"] = trt_backend.parse_compute_capabilities(
                [cc for value in req.target_ccs for cc in value.split(",") if cc.strip()]
            )
        except ValueError as e:
            raise BuildError(" ".join(str(e).split())) from None
    return trt_backend.backend(req.backend, **options)


def _backend_errors(backend: str) -> tuple[type[Exception], ...]:
    """Exceptions of `backend` that mean "this graph cannot be built" (bad input: exit 2), not an internal bug."""
    if backend in TENSORRT_BACKENDS:
        from fvrt.builder.backends.tensorrt import TensorRTBuildError

        return (TensorRTBuildError,)
    return ()


# --------------------------------------------------------------------------------------------------------------
# keys


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_identity(plan: Plan) -> dict[str, str | None]:
    """sha256 of every weight source: main file, upsampler file, Gemma weights (random: config + seed)."""
    req = plan.request
    if req.random is not None:
        assert plan.version is not None
        return {"main": random_identity(req.random, plan.version, req.seed)}
    gemma = None
    if req.gemma is not None:
        files = sorted(p for p in Path(req.gemma).iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
        gemma = _sha256_json({p.name: sha256_file(p) for p in files})
    return {
        "main": sha256_file(Path(req.checkpoint)),
        "upsampler": sha256_file(Path(req.upsampler)) if req.upsampler else None,
        "gemma": gemma,
    }


def tool_versions(device: torch.device) -> dict[str, str | None]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cc = "{}.{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    return {"fvrt": fvrt.__version__, "torch": torch.__version__, "gpu": gpu, "compute_capability": cc}


def recipe(plan: Plan) -> dict[str, Any]:
    """What characterises the artifact besides the weights (style item 4): no paths, no times."""
    req = plan.request
    out = {
        "format": FORMAT_VERSION,
        "backend": req.backend,
        "precision": req.precision,
        "device": req.device,
        "attention": req.attention,
        "conv_layout": req.conv_layout,
        "profiles": [p._asdict() for p in plan.profiles],
        "stages": plan.stages,
    }
    if req.precision in QUANTIZED and req.calib_inputs is not None:
        out["calibration"] = {"method": req.calib_method, "inputs_sha256": _tensors_sha256(req.calib_inputs)}
    elif req.precision in QUANTIZED:  # the scales depend on the calibration data
        prompts, images = calibration_files(req)
        out["calibration"] = {
            "method": req.calib_method,
            "count": req.calib_count,
            "prompts_sha256": sha256_file(prompts),
            "images_sha256": [sha256_file(p) for p in images],
        }
    if req.text_precision != "bf16":  # the text scales depend on the calibration prompts
        prompts, _ = calibration_files(req)
        out["text"] = {
            "precision": req.text_precision,
            "method": req.calib_method,
            "prompts_sha256": sha256_file(prompts),
        }
    if req.backend == "torch-aot":  # the wrapper library depends on its compiler
        out["cxx"] = plan.backend.compiler.version or plan.backend.compiler.path
    if req.backend in TENSORRT_BACKENDS:  # the plans depend on the library version and the target GPUs too
        out["tensorrt"] = plan.backend.version()
        out["compute_capabilities"] = list(plan.backend.compute_capabilities())
    return out


def _tensors_sha256(passes: Sequence[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for kw in passes:
        for name in sorted(kw):
            t = kw[name]
            h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stage_keys(
    plan: Plan, stage: str, config: dict[str, Any], ckpt_id: dict[str, Any], spec: EngineSpec | None = None
) -> tuple[str, str]:
    """(code key, stage key) of one engine: the code depends on the recipe, the architecture config and the tools;
    the whole stage (code + weights) also on the checkpoint and, for per-layer engines, on its layer list."""
    r = {k: v for k, v in recipe(plan).items() if k != "stages"}
    r["attention"] = fp8_attention.for_stage(r["attention"], stage)
    layout = stage_conv_layout(r.pop("conv_layout", "auto"), stage, torch.device(r["device"]))
    if r["backend"] == "torch-aot" and layout != "ncdhw":
        r["conv_layout"] = layout  # the code reads it
    low = low_bit_kind(spec) if spec is not None else None
    text = stage.startswith("text_")
    if not text or low is None:
        r.pop("text", None)  # the text encoder's quantisation keys only the engines holding its FP8 layers
    if r["precision"] in QUANTIZED and (text or low is None):
        # an engine of an fp8 / nvfp4 build without DiT low-bit layers (text, VAE, the DiT's bf16 blocks, prep,
        # in, out) is the bf16 engine, with the bf16 keys: a directory of bf16 engines lends it (its code, and its
        # weights where the layer list is the same), so an fp8 build next to a bf16 one compiles only the FP8 blocks
        r["precision"] = "bf16"
        r.pop("calibration", None)
    code = _sha256_json({"stage": stage, **r, "config": config, "tools": tool_versions(plan.device)})
    layers = {"layers": spec.layers} if spec is not None and spec.per_layer else {}
    return code, _sha256_json({"code": code, "checkpoint": ckpt_id, **layers})


# --------------------------------------------------------------------------------------------------------------
# building


def _load(plan: Plan, scratch: Path, log: Log) -> LTXCheckpoint:
    req = plan.request
    if req.random == "tiny":
        assert plan.version is not None
        log(f"writing a tiny random LTX-{plan.version.value} release to {scratch}")
        write_tiny_release(scratch, plan.version, seed=req.seed)
        return load_tiny_release(scratch, plan.dtype, plan.device)
    if req.random == "full":
        assert plan.version is not None
        need = _loader_stages(ENGINE_NAMES if req.precision in QUANTIZED else plan.stages)
        log(f"building a full-size random LTX-{plan.version.value} on {plan.device} ({', '.join(sorted(need))})")
        return full_random_checkpoint(
            plan.version, dtype=plan.dtype, device=plan.device, seed=req.seed, materialize=need
        )
    log(f"loading {req.checkpoint}")
    return load_checkpoint(
        req.checkpoint, upsampler=req.upsampler, gemma=req.gemma, dtype=plan.dtype, device=plan.device
    )


def _loader_stages(engines: Sequence[str]) -> set[str]:
    """Loader stages whose weights the given engines read."""
    need: set[str] = set()
    for e in engines:
        need |= {
            **{t: {"text_encoder", "text_projection"} for t in TEXT_ENGINES},
            "video_encoder": {"video_encoder"},
            "upsampler": {"upsampler", "video_encoder", "video_decoder"},  # + the VAE latent statistics
            "video_decoder": {"video_decoder"},
            "audio_decoder": {"audio_decoder", "vocoder"},
        }.get(e, {"dit"})
    return need


def _save_tokenizer(plan: Plan, dst: Path, scratch: Path) -> None:
    """Save the Gemma tokenizer into `dst` as the runtime reads it."""
    req = plan.request
    if req.gemma is not None:
        src = Path(req.gemma)
    elif req.random == "tiny":
        src = scratch / "gemma"
    else:  # random full: no real Gemma tokenizer exists offline; the tiny one (its ids < the 12B vocab)
        src = _write_tiny_tokenizer(scratch / "gemma-tokenizer")
    if not any((src / n).is_file() for n in TOKENIZER_FILES):
        raise BuildError(f"--gemma: {src} has none of the tokenizer files {', '.join(TOKENIZER_FILES)}")
    # The runtime reads the fast tokenizer (tokenizer.json) with the `tokenizers` package alone; saving what
    # transformers loads for the official LTXVGemmaTokenizer gives it exactly the official ids (a raw
    # sentencepiece read of tokenizer.model does not: no BOS post-processor).
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(dst))
    except (OSError, ValueError) as e:
        raise BuildError(f"--gemma: cannot load the tokenizer in {src}: {e}") from None


def _copy_tokenizer(plan: Plan, tmp: Path, scratch: Path, log: Log) -> dict[str, str]:
    """Save the Gemma tokenizer into tmp/tokenizer/ as the runtime reads it; returns {relative path: sha256}."""
    dst = tmp / TOKENIZER_DIR
    _save_tokenizer(plan, dst, scratch)
    out = {f"{TOKENIZER_DIR}/{f.name}": sha256_file(f) for f in sorted(dst.iterdir()) if f.is_file()}
    log(f"tokenizer: saved {', '.join(sorted(p.rsplit('/', 1)[-1] for p in out))}")
    return out


def _write_tiny_tokenizer(folder: Path) -> Path:
    """The tiny Gemma's sentencepiece tokenizer alone (what `write_tiny_gemma` writes, minus the weights and
    the config, which need the official package)."""
    from fvrt.builder.tiny_gemma import _tokenizer_model

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(_tokenizer_model())
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def _existing(out: Path) -> Manifest | None:
    """The current engine directory's manifest, if it is one and its files are intact."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(out)
        verify(out, manifest)
    except EngineError as e:
        logger.info("existing %s is not reusable: %s", out, e)
        return None
    return manifest


def _reuse(old_dir: Path, entry: StageEntry, tmp: Path, *, weights: bool = True) -> None:
    """Copy an engine's files (its code: `file` and every file of `files`, e.g. one TensorRT plan per shape key;
    with `weights`, its weights file too) from the old directory."""
    for f in {entry.file, *entry.files, *([entry.weights] if weights and entry.weights else [])}:
        link_or_copy(old_dir / f, tmp / f)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` to `dst` (engine files are never modified in place: a rebuild writes new files and the
    sha256 in the manifest guards them), copying where links are impossible (another file system). A full-size
    build holds ~60 GB of weights: a copy per rebuild would double the disk it needs."""
    src, dst = Path(src), Path(dst)  # shutil.copytree(copy_function=...) passes strings
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def low_bit_kind(spec: EngineSpec) -> str | None:
    """The low-bit kind ("nvfp4" / "fp8") the engine computes with, else None. Per-layer engines: their layers;
    others: their module outside the per-layer stacks (the DiT's `transformer_blocks`, Gemma's `layers`), which
    only the block engines run."""
    if spec.per_layer:
        mods = [m for layer in spec.per_layer for m in layer.modules()]
    else:
        stacks = {"transformer_blocks", "layers"}
        mods = [m for n, m in spec.module.named_modules() if not stacks & set(n.split("."))]
    kinds = {getattr(m, "PRECISION", None) for m in mods}
    return next((p for p in reversed(PRECISION_TABLE) if p in kinds), None)


def stage_precision(plan: Plan, spec: EngineSpec) -> str:
    """The manifest precision of one engine: fp8 / nvfp4 for engines holding such layers, else the dtype."""
    kind = low_bit_kind(spec)
    if kind is not None:
        return kind
    return "bf16" if plan.request.precision in QUANTIZED else plan.request.precision


def _calib_tokenizer(plan: Plan, scratch: Path) -> Path:
    """The tokenizer as the runtime reads it, saved once per build for the calibration runs (DiT and text)."""
    tok = scratch / "calib-tokenizer"
    if not tok.is_dir():
        tok.mkdir(parents=True)
        _save_tokenizer(plan, tok, scratch)
    return tok


def _quantize(plan: Plan, ckpt: LTXCheckpoint, scratch: Path, log: Log) -> dict[str, Any]:
    """Calibrate the DiT on real pipeline runs (calib_data) with ModelOpt and convert its Linears in place."""
    from fvrt.builder.quant.calibrate import quantize_model
    from fvrt.builder.quant.nvfp4 import BLOCK as NVFP4_BLOCK
    from fvrt.builder.quant.pipeline_calib import pipeline_dit_inputs, read_prompts, spread
    from fvrt.builder.quant.recipe import Precision, QuantRecipe

    req = plan.request
    profile = plan.profiles[0]
    prompts: list[str] = []
    images: list[Path] = []
    if req.calib_inputs is not None:
        inputs = list(req.calib_inputs)
        log(f"calibration: {len(inputs)} recorded DiT passes given")
    else:
        prompts_file, images = calibration_files(req)
        prompts = spread(read_prompts(prompts_file), req.calib_count)
        tok = _calib_tokenizer(plan, scratch)
        log(f"calibration: {len(prompts)} pipeline runs at {profile.name} ({prompts_file}, {len(images)} images)")
        inputs = pipeline_dit_inputs(ckpt, profile, prompts, tok, images=images, device=plan.device, log=log)
    recipe_ = QuantRecipe.named(req.precision)
    exclude = list(recipe_.exclude)
    if recipe_.precision is Precision.NVFP4:  # 16-element blocks: narrower inputs stay bf16 (never in the 22B)
        odd = [n for n in recipe_.select_linears(ckpt.dit) if ckpt.dit.get_submodule(n).in_features % NVFP4_BLOCK]
        exclude += odd
        if odd:
            log(f"calibration: {len(odd)} Linears with an input width not a multiple of {NVFP4_BLOCK} stay bf16")
    report = quantize_model(ckpt.dit, recipe_, inputs, method=req.calib_method, exclude=exclude)
    del inputs
    log(f"calibration: {len(report.layers)} DiT Linears -> {req.precision} from {report.passes} DiT passes")
    return {
        "recipe": {**recipe_.to_json(), "exclude": exclude},
        "method": report.method,
        "passes": report.passes,
        "prompts": len(prompts),
        "images": len(images),
        "profile": profile.name,
        "layers": len(report.layers),
    }


def _quantize_text(plan: Plan, ckpt: LTXCheckpoint, scratch: Path, log: Log) -> dict[str, Any]:
    """--text-precision fp8: calibrate the Gemma decoder layers' Linears on every calibration prompt (tokenized as
    the runtime tokenizes; 1024 tokens each) and convert them in place (embeddings stay bf16). The feature
    extractor and connectors (text_out) stay bf16. DiT calibration, when there is one, ran before this on bf16
    text contexts."""
    from fvrt.builder.quant.calibrate import quantize_model
    from fvrt.builder.quant.pipeline_calib import read_prompts
    from fvrt.builder.quant.recipe import TEXT_ENCODER_DEFAULT_EXCLUDE, QuantRecipe
    from fvrt.runtime.tokenizer import PromptTokenizer

    req = plan.request
    prompts_file, _ = calibration_files(req)
    prompts = read_prompts(prompts_file)
    tokenizer = PromptTokenizer(_calib_tokenizer(plan, scratch))
    inputs = []
    for prompt in prompts:
        ids, mask = tokenizer(prompt)
        inputs.append({"input_ids": ids.to(plan.device), "attention_mask": mask.to(plan.device)})
    recipe_ = QuantRecipe.named(req.text_precision)
    exclude = list(TEXT_ENCODER_DEFAULT_EXCLUDE)
    report = quantize_model(
        ckpt.text_encoder,
        recipe_,
        inputs,
        run=lambda m, inp: m(inp["input_ids"], inp["attention_mask"]),
        method=req.calib_method,
        exclude=exclude,
    )
    log(f"text calibration: {len(report.layers)} Gemma Linears -> {req.text_precision} from {len(prompts)} prompts")
    return {
        "recipe": {"precision": req.text_precision, "exclude": exclude},
        "method": report.method,
        "prompts": len(prompts),
        "layers": len(report.layers),
    }


def _build_stage(
    plan: Plan,
    spec: EngineSpec,
    backend: Any,
    tmp: Path,
    keys: tuple[str, str],
    old: Manifest | None,
    result: BuildResult,
    log: Log,
) -> StageEntry:
    """One engine: reuse it, rebind new weights to its code, or compile it."""
    code_key, stage_key = keys
    prev = old.stages.get(spec.name) if old is not None else None
    out = Path(plan.request.out_dir)
    if prev is not None and prev.extra.get("stage_key") == stage_key:
        _reuse(out, prev, tmp)
        result.reused.append(spec.name)
        log(f"{spec.name}: unchanged, reused")
        return prev
    if prev is not None and prev.extra.get("code_key") == code_key and hasattr(backend, "rebind"):
        _reuse(out, prev, tmp, weights=False)
        entry = backend.rebind(spec, tmp, prev)
        result.rebound.append(spec.name)
        log(f"{spec.name}: code unchanged, new weights written")
    else:
        entry = backend.build(spec, tmp, precision=stage_precision(plan, spec), log=log)
        result.built.append(spec.name)
        if plan.request.verify:
            entry = replace(entry, extra={**entry.extra, "verify": _verify(plan, spec, tmp, entry, log)})
    return replace(entry, extra={**entry.extra, "code_key": code_key, "stage_key": stage_key})


def _verify(plan: Plan, spec: EngineSpec, tmp: Path, entry: StageEntry, log: Log) -> dict[str, Any]:
    """--verify: the new engine (bound to the in-memory weights) against eager on fresh sample inputs."""
    from fvrt.builder.backends.aoti import weight_file_tensors
    from fvrt.builder.verify import FP32_REFERENCED, check_against_fp32, check_engine, fp32_maxima, worst
    from fvrt.runtime.backends.aoti import AOTIEngine

    t = time.perf_counter()
    layout = entry.extra.get("conv_layout", "ncdhw")
    engine = AOTIEngine(tmp, entry, plan.device, tensors=weight_file_tensors(spec, entry.extra["weight_names"], layout))
    errs = check_engine(spec, engine)
    top = worst(errs)
    log(f"{spec.name}: verified against eager, max rel err {top:.2e} ({time.perf_counter() - t:.1f} s)")
    out: dict[str, Any] = {"max_rel_err": top, "rel_err": errs}
    if spec.name in FP32_REFERENCED and next(spec.module.parameters()).dtype != torch.float32:
        try:
            try:
                row = check_against_fp32(spec, engine, entry.extra["weight_names"])
            except torch.OutOfMemoryError:  # e.g. text_out next to the 12B Gemma and the DiT: reference on the CPU
                torch.cuda.empty_cache()
                log(f"{spec.name}: no room on the GPU for the fp32 reference, computing it on the CPU")
                row = check_against_fp32(spec, engine, entry.extra["weight_names"], on=torch.device("cpu"))
        except (torch.OutOfMemoryError, RuntimeError) as e:  # information only: never fail a build over it
            log(f"{spec.name}: no fp32 reference ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        else:
            out["vs_fp32"] = row
            e_max, b_max = fp32_maxima(row)
            log(f"{spec.name}: against fp32 tensors: engine {e_max:.2e}, eager {b_max:.2e}")
    del engine
    return out


def _drop_stages(ckpt: LTXCheckpoint, names: Sequence[str]) -> None:
    """Free the device memory of loader stages no later engine reads (their engines are written; the specs of
    later engines hold what they need, e.g. the VAE latent statistics, as their own tensors)."""
    for n in names:
        module = getattr(ckpt, n, None)
        if isinstance(module, torch.nn.Module):
            module.to("meta")
    if names and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build to `out`; the previous directory (if any) is removed only afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _build_env(plan: Plan, ckpt: LTXCheckpoint, ckpt_id: dict[str, Any]) -> BuildEnv:
    tools = tool_versions(plan.device)
    trt_version, cc = None, tools["compute_capability"]
    if plan.request.backend in TENSORRT_BACKENDS:  # RTX: the AOT target list; full TensorRT: the build GPU
        trt_version, cc = plan.backend.version(), ",".join(plan.backend.compute_capabilities())
    return BuildEnv(
        fvrt_version=fvrt.__version__,
        torch_version=torch.__version__,
        tensorrt_version=trt_version,
        gpu_name=tools["gpu"],
        compute_capability=cc,
        model_version=ckpt.version.value,
        checkpoint_sha256=ckpt_id["main"],
        device=plan.device.type,
    )


def _build_into(
    plan: Plan,
    tmp: Path,
    scratch: Path,
    old: Manifest | None,
    keys: tuple[str, dict[str, Any]],
    log: Log,
) -> BuildResult:
    """Load the weights, build or reuse every engine into `tmp`, and return the result with its manifest."""
    req = plan.request
    build_key, ckpt_id = keys
    stages: dict[str, StageEntry] = {}
    result = BuildResult(Path(req.out_dir), None, up_to_date=False)  # type: ignore[arg-type]
    ckpt = _load(plan, scratch, log)
    quant = _quantize(plan, ckpt, scratch, log) if req.precision in QUANTIZED else None
    text_quant = _quantize_text(plan, ckpt, scratch, log) if req.text_precision != "bf16" else None
    specs = {s.name: s for s in engine_specs(ckpt, plan.profiles, device=plan.device, seed=req.seed)}
    last_use = {s: i for i, stage in enumerate(plan.stages) for s in _loader_stages([stage])}
    for i, stage in enumerate(plan.stages):  # dit_block: one engine per layer group (e.g. bf16 and FP8 blocks)
        for name in [n for n in specs if is_block_engine(n)] if stage == "dit_block" else [stage]:
            keys = stage_keys(plan, name, ckpt.config, ckpt_id, specs[name])
            entry = _build_stage(plan, specs[name], plan.backend, tmp, keys, old, result, log)
            if quant is not None and is_block_engine(name):
                entry = replace(entry, extra={**entry.extra, "quantization": quant})
            if text_quant is not None and name == "text_block":
                entry = replace(entry, extra={**entry.extra, "quantization": text_quant})
            stages[name] = entry
        # full size: 12B Gemma + 19B DiT + the 1080p decode (--verify) do not fit 80 GB together
        _drop_stages(ckpt, [s for s, last in last_use.items() if last == i])
    assets = _copy_tokenizer(plan, tmp, scratch, log) if set(TEXT_ENGINES) & set(plan.stages) else {}
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        profiles={p.name: {k: v for k, v in p._asdict().items() if k != "name"} for p in plan.profiles},
        stages=stages,
        build=_build_env(plan, ckpt, ckpt_id),
        config=ckpt.config,
        assets=assets,
        build_key=build_key,
    )
    result.manifest = manifest
    return result


def build_engines(req: BuildRequest, log: Log = logger.info) -> BuildResult:
    """Validate, then build (or reuse) the engine directory `req.out_dir`. Raises BuildError (one line) for bad
    input or a full disk, CheckpointError for an unusable checkpoint; leaves no partial directory behind."""
    plan = validate(req)
    out = Path(req.out_dir)
    t0 = time.perf_counter()
    try:
        ckpt_id = checkpoint_identity(plan)
        build_key = _sha256_json({"recipe": recipe(plan), "checkpoint": ckpt_id, "tools": tool_versions(plan.device)})
        old = _existing(out)
        if old is not None and old.build_key == build_key:
            log(f"{out}: up to date (build key {build_key[:12]}), nothing rebuilt")
            return BuildResult(out, old, up_to_date=True, reused=list(old.stages))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
        tmp.chmod(ENGINE_DIR_MODE)  # mkdtemp makes it owner-only
    except OSError as e:
        raise _os_error(e, out) from None
    lines: list[str] = []

    def tee(msg: str) -> None:
        lines.append(f"{time.perf_counter() - t0:8.1f}s  {msg}")
        log(msg)

    try:
        with tempfile.TemporaryDirectory(prefix="fvrt-build-") as scratch:
            result = _build_into(plan, tmp, Path(scratch), old, (build_key, ckpt_id), tee)
        n_built, n_reused, n_new = len(result.built), len(result.reused), len(result.rebound)
        tee(f"built {n_built}, reused {n_reused}, new weights {n_new} in {time.perf_counter() - t0:.1f} s")
        (tmp / BUILD_LOG).write_text("\n".join(lines) + "\n")
        files = [f for f, _, _ in manifest_files(result.manifest)]
        result.manifest = replace(result.manifest, chunks=chunk_digests(tmp, files))
        write_manifest(tmp, result.manifest)
        _swap_into_place(tmp, out)
        return result
    except OSError as e:
        raise _os_error(e, out) from None
    except _backend_errors(req.backend) as e:  # e.g. TensorRT refused a graph: one line, nothing written
        raise BuildError(" ".join(str(e).split())) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _os_error(e: OSError, out: Path) -> BuildError:
    if e.errno == errno.ENOSPC:
        return BuildError(f"disk full while building {out} ({e.filename or 'write'}); nothing was written")
    return BuildError(f"cannot write {out}: {e.strerror or e} ({e.filename or ''})")


def describe(result: BuildResult) -> str:
    """One line per engine: name, backend, build seconds, code MB, weights MB (the CLI's summary table)."""
    rows = [f"{'engine':<14} {'backend':<10} {'build s':>8} {'code MB':>9} {'weights MB':>11}  status"]
    status = {n: "built" for n in result.built} | {n: "reused" for n in result.reused}
    status |= {n: "new weights" for n in result.rebound}
    stages = result.manifest.stages
    for name, e in sorted(stages.items(), key=lambda kv: ENGINE_NAMES.index(kv[0]) if kv[0] in ENGINE_NAMES else 99):
        rows.append(
            f"{name:<14} {e.backend:<10} {e.extra.get('build_seconds', 0):>8.1f} "
            f"{e.extra.get('code_bytes', 0) / 1e6:>9.2f} {e.extra.get('weights_bytes', 0) / 1e6:>11.2f}  "
            f"{status.get(name, '')}"
        )
    return "\n".join(rows)


__all__ = ["ENGINE_NAMES", "BuildError", "BuildRequest", "BuildResult", "build_engines", "describe", "validate"]
