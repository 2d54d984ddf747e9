"""Official LTX-2 / LTX-2.3 checkpoints -> fvrt stage modules.

The official release is one safetensors file (DiT, text projection and connectors, video VAE, audio VAE,
vocoder) whose header carries a `config` JSON, plus a separate upsampler file and a Gemma folder in the
Hugging Face layout. Each stage declares, in its model file, a `StageSpec`: an ordered table of key rules
(checkpoint prefix -> module prefix) and a constructor from the `config` metadata. Loading is strict: a
missing, unexpected or mis-shaped tensor is an error naming it, and nothing is left randomly initialised.

Files are memory-mapped (copy-on-write), so a 46 GB checkpoint costs no RAM until a tensor is touched.
Only safetensors is read: pickle-based files (.ckpt/.pt/.bin) are refused, never unpickled.
"""

from __future__ import annotations

import enum
import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvrt.builder.safetensors_io import (
    CONFIG_KEY,
    CheckpointError,
    KeyRule,
    SafetensorsFile,
    save_safetensors,
)


class ModelVersion(enum.Enum):
    """Architecture generation, chosen from the checkpoint's `config` metadata (not from file names)."""

    LTX2 = "2.0"  # LTX-2, 19B
    LTX23 = "2.3"  # LTX-2.3, 22B

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelVersion:
        """2.3 moved the caption projection in front of the connectors and added cross-attention AdaLN;
        ltx-core selects the architecture from exactly these flags (`model_configurator.py`)."""
        tr = config.get("transformer")
        if not isinstance(tr, Mapping):
            raise CheckpointError("checkpoint config has no 'transformer' section")
        v23 = bool(tr.get("caption_proj_before_connector", False))
        if v23 != bool(tr.get("cross_attention_adaln", False)):
            raise CheckpointError(
                "checkpoint config mixes LTX-2 and LTX-2.3 flags: caption_proj_before_connector="
                f"{tr.get('caption_proj_before_connector')} but cross_attention_adaln={tr.get('cross_attention_adaln')}"
            )
        return cls.LTX23 if v23 else cls.LTX2


def require(section: Mapping[str, Any], key: str, where: str) -> Any:
    """Read a config knob that changes the math; absent is an error, never a silent default."""
    if key not in section:
        raise CheckpointError(f"config section '{where}' lacks required key '{key}'")
    return section[key]


def check_value(section: Mapping[str, Any], key: str, expected: Any, where: str) -> None:
    """Refuse a config knob whose value selects a variant fvrt does not implement."""
    if key in section and section[key] != expected:
        raise CheckpointError(
            f"config '{where}.{key}' = {section[key]!r} is not supported (fvrt implements {expected!r})"
        )


# --------------------------------------------------------------------------------------------------------------
# safetensors, memory-mapped


# --------------------------------------------------------------------------------------------------------------
# stages


@dataclass(frozen=True)
class StageSpec:
    """How one fvrt stage is found in, built from and written to an official checkpoint file.

    rules: ordered; the first rule whose checkpoint prefix matches a key decides it.
    build: `config` metadata dict -> module (called under the meta device by the loader).
    randomize: optional custom random init for `build_random` (default: N(0, 0.02) weights, unit norms).
    """

    name: str
    rules: tuple[KeyRule, ...]
    build: Callable[[Mapping[str, Any]], nn.Module]
    randomize: Callable[[nn.Module, torch.Generator], None] | None = None
    file: str = "main"  # "main" checkpoint or the separate "upsampler" file

    def module_key(self, ckpt_key: str) -> str | None:
        for ckpt_prefix, mod_prefix in self.rules:
            if ckpt_key.startswith(ckpt_prefix):
                return None if mod_prefix is None else mod_prefix + ckpt_key[len(ckpt_prefix) :]
        return None

    def checkpoint_key(self, module_key: str) -> str:
        """Inverse of `module_key`: the most specific (longest) matching module prefix decides, so a rule like
        `("vae.per_channel_statistics.", "per_channel_statistics.")` wins over a catch-all `("vae.decoder.", "")`
        whatever their order."""
        matches = [(m, c) for c, m in self.rules if m is not None and module_key.startswith(m)]
        if not matches:
            raise KeyError(f"stage {self.name}: no key rule maps module key '{module_key}'")
        mod_prefix, ckpt_prefix = max(matches, key=lambda mc: len(mc[0]))
        return ckpt_prefix + module_key[len(mod_prefix) :]


# Stage name -> module that defines `STAGES` (a tuple of StageSpec). Imported lazily so that loading one stage
# does not import every model file.
_STAGE_MODULES: dict[str, str] = {
    "text_projection": "fvrt.builder.models.text",
    "dit": "fvrt.builder.models.dit",
    "video_encoder": "fvrt.builder.models.video_vae",
    "video_decoder": "fvrt.builder.models.video_vae",
    "audio_decoder": "fvrt.builder.models.audio_vae",
    "vocoder": "fvrt.builder.models.vocoder",
    "upsampler": "fvrt.builder.models.upsampler",
}
STAGE_NAMES: tuple[str, ...] = tuple(_STAGE_MODULES)

IGNORED_PREFIXES: tuple[str, ...] = (
    "audio_vae.encoder.",
    "vae.per_channel_statistics.channel",
    "vae.per_channel_statistics.mean-of-stds",
    "audio_vae.per_channel_statistics.channel",
    "audio_vae.per_channel_statistics.mean-of-stds",
)
"""Official tensors fvrt never uses: the audio VAE encoder (audio-to-video paths only) and the per-channel
statistics that no official module reads (releases store `channel` and `mean-of-stds` beside the used ones)."""


def stage_spec(name: str) -> StageSpec:
    if name not in _STAGE_MODULES:
        raise CheckpointError(f"unknown stage '{name}'; known: {', '.join(STAGE_NAMES)}")
    mod = importlib.import_module(_STAGE_MODULES[name])
    for spec in mod.STAGES:
        if spec.name == name:
            return spec
    raise RuntimeError(f"{_STAGE_MODULES[name]} defines no stage '{name}'")


def _build_on_meta(spec: StageSpec, config: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return spec.build(config)


def _finalize(module: nn.Module) -> nn.Module:
    """Materialise derived constants (submodules may define `init_constants()`), then refuse meta leftovers."""
    for m in module.modules():
        fn = getattr(m, "init_constants", None)
        if callable(fn):
            fn()
    left = [n for n, p in module.named_parameters() if p.is_meta] + [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__}: uninitialised tensors after loading: {', '.join(left[:8])}")
    return module.eval()


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype.itemsize > 1:  # float8 weights stay as stored
        t = t.to(dtype)
    return t.to(device)


def _prepare_prequantized(module: nn.Module, spec: StageSpec, file: SafetensorsFile) -> set[str]:
    """Hook for pre-quantised files (official `-fp8` releases: `<layer>.weight_scale` / `.input_scale` next to a
    float8 `.weight`): those layers become quantised modules before loading, and the returned module keys keep
    their stored dtypes. See fvrt.builder.quant.layers."""
    if not any(k.endswith(".weight_scale") and spec.module_key(k) is not None for k in file.entries):
        return set()
    from fvrt.builder.quant.layers import prepare_prequantized

    entries = {k: (e.dtype, e.shape) for k, e in file.entries.items()}
    return prepare_prequantized(module, entries, spec.module_key)


def load_stage(
    spec: StageSpec,
    file: SafetensorsFile,
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
) -> tuple[nn.Module, set[str]]:
    """Build `spec` from `config` and load its tensors from `file`. Returns (module, checkpoint keys used)."""
    device = torch.device(device)
    module = _build_on_meta(spec, config)
    stored_dtype = _prepare_prequantized(module, spec, file)
    expected = module.state_dict()
    found: dict[str, str] = {}  # module key -> checkpoint key
    for ck in file.entries:
        mk = spec.module_key(ck)
        if mk is not None:
            if mk not in expected:
                raise CheckpointError(f"{file.path}: unexpected tensor '{ck}' (stage {spec.name} has no '{mk}')")
            found[mk] = ck
    missing = [k for k in expected if k not in found]
    if missing:
        ck = spec.checkpoint_key(missing[0])
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{file.path}: missing tensor '{ck}' for stage {spec.name}{more}")
    state = {}
    for mk, ck in found.items():
        info = file.entries[ck]
        want = tuple(expected[mk].shape)
        if info.shape != want:
            raise CheckpointError(
                f"{file.path}: tensor '{ck}' has shape {list(info.shape)}, stage {spec.name} expects {list(want)}"
            )
        state[mk] = _cast(file.tensor(ck), None if mk in stored_dtype else dtype, device)
    module.load_state_dict(state, strict=True, assign=True)
    return _finalize(module), set(found.values())


def default_randomize(module: nn.Module, gen: torch.Generator, std: float = 0.02) -> None:
    """N(0, std) weights and biases; norm layers get weight 1, bias 0; persistent buffers 1 + N(0, std)
    (stages whose buffers have a stricter meaning pass their own `randomize`)."""
    norm_types = (nn.RMSNorm, nn.GroupNorm, nn.LayerNorm)

    def draw(t: torch.Tensor) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen, device=gen.device) * std).to(t.dtype)

    with torch.no_grad():
        for m in module.modules():
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, norm_types):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                else:
                    p.copy_(draw(p))
            for _, b in m.named_buffers(recurse=False):
                if b.is_floating_point():
                    b.copy_(1.0 + draw(b))


def build_random(
    name: str,
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> nn.Module:
    """Random-weight stage built with the same code as a loaded one: on meta, then `to_empty` directly on
    `device` (a full-size DiT goes straight to the GPU, never through host memory)."""
    spec = stage_spec(name)
    device = torch.device(device)
    module = _build_on_meta(spec, config).to(dtype).to_empty(device=device)  # cast on meta: no fp32 copy
    gen = torch.Generator(device=device).manual_seed(seed)
    (spec.randomize or default_randomize)(module, gen)
    return _finalize(module)


def stage_checkpoint_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors under their official checkpoint keys (inverse of loading)."""
    spec = stage_spec(name)
    return {spec.checkpoint_key(k): v for k, v in module.state_dict().items()}


def save_checkpoint(
    path: str | Path,
    modules: Mapping[str, nn.Module],
    config: Mapping[str, Any],
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write stage modules as one official-format safetensors file with its `config` metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update(stage_checkpoint_tensors(name, module))
    meta = {CONFIG_KEY: json.dumps(config), **(extra_metadata or {})}
    save_safetensors(path, tensors, meta)


# --------------------------------------------------------------------------------------------------------------
# the public entry point


@dataclass
class LTXCheckpoint:
    """Loaded stages of one LTX-2 / LTX-2.3 release. Stages that were not requested are None."""

    version: ModelVersion
    config: dict[str, Any]
    metadata: dict[str, str]
    text_encoder: nn.Module | None = None
    text_projection: nn.Module | None = None
    dit: nn.Module | None = None
    video_encoder: nn.Module | None = None
    video_decoder: nn.Module | None = None
    upsampler: nn.Module | None = None
    audio_decoder: nn.Module | None = None
    vocoder: nn.Module | None = None
    upsampler_config: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(
    path: str | Path,
    *,
    upsampler: str | Path | None = None,
    gemma: str | Path | None = None,
    stages: Iterable[str] | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> LTXCheckpoint:
    """Load an official LTX-2 / LTX-2.3 release into fvrt stage modules.

    Args:
        path: the single-file safetensors checkpoint with its `config` metadata.
        upsampler: the separate latent upsampler safetensors file (needed for stage "upsampler").
        gemma: the Gemma-3 folder in the Hugging Face layout (needed for stage "text_encoder").
        stages: which stages to load; default all that the given files allow. When every stage of the main
            file is loaded, a tensor that no stage claims is an error.
        dtype: floating dtype of the weights (float8 weights stay float8); None keeps the stored dtypes.
        device: where the weights live; CPU tensors stay memory-mapped until written.
    """
    main = SafetensorsFile(path)
    config = main.config()
    version = ModelVersion.from_config(config)
    wanted = (
        list(stages)
        if stages is not None
        else [
            *(s for s in STAGE_NAMES if s != "upsampler" or upsampler is not None),
            *(["text_encoder"] if gemma is not None else []),
        ]
    )
    out = LTXCheckpoint(version=version, config=config, metadata=dict(main.metadata))
    used: set[str] = set()
    for name in wanted:
        if name == "text_encoder":
            if gemma is None:
                raise CheckpointError("stage text_encoder needs the Gemma folder (gemma=...)")
            from fvrt.builder.models.gemma import load_gemma

            out.text_encoder = load_gemma(gemma, dtype=dtype, device=device)
            continue
        spec = stage_spec(name)
        if spec.file == "upsampler":
            if upsampler is None:
                raise CheckpointError("stage upsampler needs the upsampler file (upsampler=...)")
            up = SafetensorsFile(upsampler)
            out.upsampler_config = up.config()
            module, up_keys = load_stage(spec, up, out.upsampler_config, dtype=dtype, device=device)
            unused = sorted(set(up.entries) - up_keys)
            if unused:
                raise CheckpointError(f"{up.path}: unexpected tensor '{unused[0]}'")
        else:
            module, keys = load_stage(spec, main, config, dtype=dtype, device=device)
            used |= keys
        setattr(out, name, module)
    if set(STAGE_NAMES) - {"upsampler"} <= set(wanted):
        stray = sorted(k for k in main.entries if k not in used and not k.startswith(IGNORED_PREFIXES))
        if stray:
            raise CheckpointError(f"{main.path}: unexpected tensor '{stray[0]}' (no fvrt stage uses it)")
    return out
