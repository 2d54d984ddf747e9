"""Safetensors files, the one weight format fvrt reads: a memory-mapped read-only view (`SafetensorsFile`), a
streaming writer (`save_safetensors`), and `CheckpointError`, the one-line error of an unusable weights file.

The lowest layer of the builder's weight loading: `checkpoint` (the official release's stages), `models.gemma`
(the Gemma folder) and `quant.layers` (pre-quantised layers) read files through it and import nothing above it.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


KeyRule = tuple[str, str | None]
"""(checkpoint prefix, module prefix); a None module prefix claims the keys for no module (another stage)."""
