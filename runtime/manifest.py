"""The engine-directory contract: `manifest.json`, written by the builder, verified by the runtime.

One `Manifest` type serves the writer, the reader and the tests. The runtime refuses, with one clear line, an
engine directory that is incomplete or tampered with (sha256), or built for another GPU (compute capability),
another torch / TensorRT version, or another manifest format. This module imports only the standard library so
that the lean runtime can validate a directory before it imports anything heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 2: what the runtime reads of per-layer engines is typed `StageEntry` fields, not `extra`
MANIFEST_NAME = "manifest.json"
BACKENDS = ("torch-aot", "tensorrt", "tensorrt-rtx")
_HASH_CHUNK = 1 << 24
CHUNK_BYTES = 1 << 28
"""Files of at least this size also get one sha256 per 256 MiB chunk in the manifest (`Manifest.chunks`): they
verify on every core at load (72 GB of full-size weights: seconds instead of half a minute on one core)."""


class EngineError(ValueError):
    """An engine directory is unusable here; the message says which file or field and why."""


def json_object(text: str, what: str, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """`text` parsed as a JSON object; `error("<what>: not JSON (...)")` or `error("<what>: expected a JSON object,
    got <type>")` otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: name, dtype (torch name, e.g. "bfloat16") and shape per profile."""

    name: str
    dtype: str
    shapes: dict[str, list[int]]  # profile name -> static shape


@dataclass(frozen=True)
class StageEntry:
    name: str
    backend: str
    file: str
    sha256: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights: str | None = None  # separate safetensors file when the backend keeps weights apart
    weights_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # every engine file (e.g. one per shape key) -> sha256
    # the engine's weight inputs in order (torch-aot: their names in the weights file; per-layer engines: the names
    # after the `layers.{i}.` prefix)
    weight_names: list[str] = field(default_factory=list)
    per_layer: int = 0  # weight sets a per-layer engine (DiT block, Gemma layer) is applied to; 0 = not per-layer
    layers: list[int] = field(default_factory=list)  # per-layer engines: the model layer of each weight set
    layer_kinds: list[int] = field(default_factory=list)  # text_block: per layer, which of text_in's tables it takes


@dataclass(frozen=True)
class BuildEnv:
    fvrt_version: str
    torch_version: str
    tensorrt_version: str | None
    gpu_name: str | None
    compute_capability: str | None  # "9.0"; for CPU-only AOT builds the target list, e.g. "8.9,12.0"
    model_version: str
    checkpoint_sha256: str | None
    device: str = "cpu"  # where the engines run: "cpu" or "cuda" (torch-aot code is compiled for one of them)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    profiles: dict[str, dict[str, int]]  # profile name -> {"height":..,"width":..,"frames":..,...}
    stages: dict[str, StageEntry]
    build: BuildEnv
    config: dict[str, Any]  # the checkpoint's `config` metadata, so the directory is self-describing
    assets: dict[str, str] = field(default_factory=dict)  # other files (tokenizer/...) -> sha256, verified too
    build_key: str = ""  # sha256 of the canonical recipe + checkpoint hash + tool versions; same key = up to date
    # big files: {"size", "chunk_bytes", "sha256": [one per chunk]}; verified instead of the whole-file hash
    chunks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Manifest:
        try:
            stages = {
                k: StageEntry(
                    **{
                        **v,
                        "inputs": [TensorSpec(**t) for t in v["inputs"]],
                        "outputs": [TensorSpec(**t) for t in v["outputs"]],
                    }
                )
                for k, v in raw["stages"].items()
            }
            return cls(
                format_version=int(raw["format_version"]),
                profiles={k: dict(v) for k, v in raw["profiles"].items()},
                stages=stages,
                build=BuildEnv(**raw["build"]),
                config=dict(raw["config"]),
                assets={str(k): str(v) for k, v in raw.get("assets", {}).items()},
                build_key=str(raw.get("build_key", "")),
                chunks={
                    str(k): {
                        "size": int(v["size"]),
                        "chunk_bytes": int(v["chunk_bytes"]),
                        "sha256": [str(d) for d in v["sha256"]],
                    }
                    for k, v in raw.get("chunks", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"manifest is malformed: {type(e).__name__}: {e}") from None


def sha256_file(path: Path, start: int = 0, length: int | None = None) -> str:
    """sha256 of the file, or of `length` bytes from `start`."""
    h = hashlib.sha256()
    left = length
    with path.open("rb") as f:
        f.seek(start)
        while left is None or left > 0:
            chunk = f.read(_HASH_CHUNK if left is None else min(_HASH_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))  # hashlib releases the GIL


def chunk_digests(root: str | Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """`Manifest.chunks` for the files of `files` (names relative to `root`) of at least CHUNK_BYTES."""
    root = Path(root)
    big = [(f, (root / f).stat().st_size) for f in files if (root / f).stat().st_size >= CHUNK_BYTES]
    tasks = [(f, i) for f, size in big for i in range(0, size, CHUNK_BYTES)]
    with _pool() as pool:
        digests = list(pool.map(lambda t: sha256_file(root / t[0], t[1], CHUNK_BYTES), tasks))
    out: dict[str, dict[str, Any]] = {f: {"size": size, "chunk_bytes": CHUNK_BYTES, "sha256": []} for f, size in big}
    for (f, _), d in zip(tasks, digests, strict=True):
        out[f]["sha256"].append(d)
    return out


def manifest_files(manifest: Manifest, stages: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(file relative to the directory, sha256, what) of every file of `stages` (default all) and the assets."""
    out: list[tuple[str, str, str]] = []
    for name in stages or list(manifest.stages):
        entry = manifest.stages[name]
        for file, digest in ((entry.file, entry.sha256), (entry.weights, entry.weights_sha256), *entry.files.items()):
            if file is not None:  # a missing digest fails verification like a wrong one
                out.append((file, str(digest), f"stage '{name}' file {file}"))
    out += [(f, d, f"file {f}") for f, d in manifest.assets.items()]
    return list(dict.fromkeys(out))  # a stage's `file` is also one of its `files`


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Parse `engine_dir/manifest.json` (no file hashing; see `verify`)."""
    root = Path(engine_dir)
    if root.exists() and not root.is_dir():
        raise EngineError(f"engine directory {root} is a file, not a directory")
    if not root.is_dir():
        raise EngineError(f"engine directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"{root} is not an engine directory (no {MANIFEST_NAME})")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        got = raw.get("format_version") if isinstance(raw, dict) else None
        raise EngineError(f"{path}: manifest format {got!r}, this fvrt reads format {FORMAT_VERSION}")
    return Manifest.from_dict(raw)


def verify(
    engine_dir: str | Path,
    manifest: Manifest,
    *,
    torch_version: str | None = None,
    compute_capability: str | None = None,
    tensorrt_version: str | None = None,
    stages: list[str] | None = None,
) -> None:
    """Refuse an engine directory that does not match this machine or has been altered.

    Each given environment value must equal the manifest's; every stage file (and weights file) must exist and
    hash to the recorded sha256.
    """
    root = Path(engine_dir)
    env = manifest.build
    checks = (
        ("torch", torch_version, env.torch_version),
        ("TensorRT", tensorrt_version, env.tensorrt_version),
    )
    for what, have, built in checks:
        if have is not None and built is not None and have != built:
            raise EngineError(f"{root}: engines were built with {what} {built}, this machine has {what} {have}")
    if compute_capability is not None and env.compute_capability is not None:
        targets = env.compute_capability.split(",")
        if compute_capability not in targets:
            raise EngineError(
                f"{root}: engines were built for compute capability {env.compute_capability}, "
                f"this GPU is {compute_capability}"
            )
    for name in stages or list(manifest.stages):
        if name not in manifest.stages:
            raise EngineError(f"{root}: manifest has no stage '{name}'")
        if manifest.stages[name].backend not in BACKENDS:
            raise EngineError(f"{root}: stage '{name}' has unknown backend '{manifest.stages[name].backend}'")
    checks = [(f, _inside(root, f), d, what) for f, d, what in manifest_files(manifest, stages)]
    for _, path, _, what in checks:
        if not path.is_file():
            raise EngineError(f"{root}: {what} is missing")
    # one task per small file, one per 256 MiB chunk of a big one (Manifest.chunks), all on every core
    tasks: list[tuple[Path, int, int | None, str, str]] = []  # path, start, length, expected sha256, what
    for rel, path, digest, what in checks:
        chunked = manifest.chunks.get(rel)
        if chunked is None:
            tasks.append((path, 0, None, digest, what))
            continue
        if path.stat().st_size != chunked["size"]:
            raise EngineError(f"{root}: {what} does not match its size (tampered?)")
        step = int(chunked["chunk_bytes"])
        tasks += [(path, i * step, step, d, what) for i, d in enumerate(chunked["sha256"])]
    with _pool() as pool:
        got = list(pool.map(lambda t: sha256_file(t[0], t[1], t[2]), tasks))
    for (_, _, _, digest, what), g in zip(tasks, got, strict=True):
        if g != digest:
            raise EngineError(f"{root}: {what} does not match its sha256 (tampered?)")


def _inside(root: Path, file: str) -> Path:
    """`root / file`, refusing names that leave the engine directory (absolute paths, `..`)."""
    rel = Path(file)
    if rel.is_absolute() or ".." in rel.parts:
        raise EngineError(f"{root}: manifest names a file outside the engine directory: {file}")
    return root / rel


def write_manifest(engine_dir: str | Path, manifest: Manifest) -> Path:
    """Write the manifest atomically (temporary file, then rename)."""
    path = Path(engine_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".partial")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path
