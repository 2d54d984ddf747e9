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
import mmap
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvrt.runtime.manifest import json_object

CONFIG_KEY = "config"
"""Header metadata key holding the model config JSON (official format)."""

# safetensors dtype strings -> torch dtypes (safetensors spec, "dtype" field of each header entry).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header size


class CheckpointError(ValueError):
    """A checkpoint the user pointed at is unusable; the message names the file and the tensor or key."""


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


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """Read-only view of a safetensors file; `tensor(name)` is zero-copy over a private mmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        if self.path.suffix.lower() in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{self.path}: pickle-based checkpoints are refused; convert it to safetensors")
        self.metadata, self.entries = self._read_header()
        self._mm: mmap.mmap | None = None

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: not a safetensors file (bad header length {n})")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        entries: dict[str, TensorInfo] = {}
        base = 8 + n
        for name, e in header.items():
            try:
                dtype = _ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for tensor '{name}'") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - start != numel * dtype.itemsize or base + end > size:
                raise CheckpointError(f"{self.path}: tensor '{name}' data is truncated or inconsistent")
            entries[name] = TensorInfo(dtype, shape, base + start, base + end)
        return meta, entries

    def config(self) -> dict[str, Any]:
        raw = self.metadata.get(CONFIG_KEY)
        if raw is None:
            raise CheckpointError(f"{self.path}: header metadata has no '{CONFIG_KEY}' entry")
        return json_object(raw, f"{self.path}: '{CONFIG_KEY}' metadata", CheckpointError)

    def tensor(self, name: str) -> torch.Tensor:
        info = self.entries[name]
        if self._mm is None:
            with self.path.open("rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        numel = (info.end - info.start) // info.dtype.itemsize
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._mm, dtype=info.dtype, count=numel, offset=info.start)
        return flat.view(info.shape)


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically (temporary file, then rename)."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    ordered = sorted(tensors.items())
    for name, t in ordered:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as the reference writer does
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for _, t in ordered:
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d scales: flatten first
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# stages


KeyRule = tuple[str, str | None]
"""(checkpoint prefix, module prefix); a None module prefix claims the keys for no module (another stage)."""


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
