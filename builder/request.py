"""A build request, validated once before any loading: `validate(BuildRequest(...)) -> Plan`.

Every check that needs no loading runs here (profiles, stages, backend and its options and library, precision and
calibration files, device, input files, output directory), each failure a one-line `BuildError` naming the flag,
the value and the rule. The `Plan` carries what the build loop needs: the parsed profiles, the engines in build
order, the dtype, the device and the configured backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from fvrt.builder.backends import BACKENDS, configure
from fvrt.builder.backends.base import Backend, BackendOptions, OptionError
from fvrt.builder.checkpoint import ModelVersion
from fvrt.builder.random_release import SIZES
from fvrt.builder.stages import ENGINE_NAMES, STAGE_GROUPS
from fvrt.runtime.manifest import MANIFEST_NAME
from fvrt.runtime.pipeline import SEED_MAX, SEED_MIN
from fvrt.runtime.precision import PRECISIONS as PRECISION_TABLE
from fvrt.runtime.precision import QUANTIZED, TEXT_PRECISIONS
from fvrt.runtime.shapes import PRESET_PROFILES, Profile

DEFAULT_CALIB_PROMPTS = Path("calib_data/prompts.txt")  # relative to the working directory (the repo root)
CALIB_METHODS = ("modelopt", "hooks")  # hooks: the same max statistic without ModelOpt (tests/test_quant.py)
DEVICES = ("cpu", "cuda")
# --precision (fvrt.runtime.precision): the torch dtype of the engines; the low-bit ones quantise the DiT Linears
# after calibration and keep every other tensor in that dtype
PRECISIONS = {name: getattr(torch, p.dtype) for name, p in PRECISION_TABLE.items()}
TARGET_CC_BACKENDS = tuple(n for n, b in BACKENDS.items() if "target_ccs" in b.options)  # --target-cc
_PROFILE_RE = re.compile(r"^(?:(?P<name>[A-Za-z0-9_.-]+)=)?(?P<h>\d+)x(?P<w>\d+)x(?P<f>\d+)(?:@(?P<fps>[\d.]+))?$")


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
    jobs: int = 1  # torch-aot: compile processes; > 1 compiles in worker processes while the next engines export


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
    backend: Backend  # configured with the request's options (`make_backend`)

    @cached_property
    def recipe(self) -> dict[str, Any]:
        """`fvrt.builder.keys.recipe` of this plan, computed once per build (it hashes the calibration files and
        asks the backend for its versions); the build key and every engine's keys read it."""
        from fvrt.builder.keys import recipe  # keys reads plans: imported when first asked

        return recipe(self)


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
    if not SEED_MIN <= req.seed <= SEED_MAX:
        raise BuildError(f"--seed {req.seed}: must be an integer from -2**63 to 2**64-1 (torch's seed range)")
    if req.verify and not (req.backend in BACKENDS and BACKENDS[req.backend].verifies):
        raise BuildError(f"--verify: only --backend torch-aot engines run on this machine's torch, not {req.backend}")
    if req.precision not in PRECISIONS:
        raise BuildError(f"--precision: choose one of {', '.join(PRECISIONS)}, got '{req.precision}'")
    if req.device not in DEVICES:
        raise BuildError(f"--device: choose one of {', '.join(DEVICES)}, got '{req.device}'")
    if req.device == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda: no CUDA GPU is visible on this machine")
    if req.backend not in BACKENDS:
        raise BuildError(f"--backend: unknown backend '{req.backend}'; choose one of {', '.join(BACKENDS)}")
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
        if set(STAGE_GROUPS["text_encoder"]) & set(stages) and req.gemma is None:
            raise BuildError("the text_encoder engine needs --gemma DIR (or leave it out with --stages)")
    _check_out_dir(Path(req.out_dir), req.force)
    be = make_backend(req)
    reason = be.available()
    if reason is not None:
        raise BuildError(f"--backend {req.backend}: {reason}")
    reason = be.refuse_precision(req.precision)
    if reason is not None:
        raise BuildError(reason)
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


def make_backend(req: BuildRequest) -> Backend:
    """The backend object for `req.backend` configured with the request's options; one-line BuildError for an
    option that backend does not take or a value it refuses."""
    options = BackendOptions(
        req.attention, req.target_ccs, req.cxx, req.conv_layout, torch.device(req.device), req.jobs
    )
    try:
        return configure(req.backend, options)
    except OptionError as e:
        raise BuildError(str(e)) from None
    except ImportError as e:
        raise BuildError(f"--backend {req.backend}: its builder module cannot be imported ({e})") from None
