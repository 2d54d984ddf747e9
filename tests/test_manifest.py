"""The engine-directory contract: round trip, and every refusal the runtime must make."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fvrt.runtime.manifest import (
    FORMAT_VERSION,
    BuildEnv,
    EngineError,
    Manifest,
    StageEntry,
    TensorSpec,
    json_object,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)


def _engine_dir(tmp_path: Path) -> tuple[Path, Manifest]:
    (tmp_path / "dit.pt2").write_bytes(b"engine-bytes")
    (tmp_path / "dit.safetensors").write_bytes(b"weights-bytes")
    entry = StageEntry(
        name="dit",
        backend="torch-aot",
        file="dit.pt2",
        sha256=sha256_file(tmp_path / "dit.pt2"),
        precision="bf16",
        inputs=[TensorSpec("video", "bfloat16", {"s1": [1, 8160, 128], "s2": [1, 32640, 128]})],
        outputs=[TensorSpec("video_v", "bfloat16", {"s1": [1, 8160, 128], "s2": [1, 32640, 128]})],
        weights="dit.safetensors",
        weights_sha256=sha256_file(tmp_path / "dit.safetensors"),
    )
    env = BuildEnv("0.1.0", "2.11.0+cu130", None, "NVIDIA H100 80GB HBM3", "9.0", "2.3", "ab" * 32)
    manifest = Manifest(FORMAT_VERSION, {"s2": {"height": 1088, "width": 1920, "frames": 121}}, {"dit": entry}, env, {})
    write_manifest(tmp_path, manifest)
    return tmp_path, manifest


def test_round_trip(tmp_path: Path) -> None:
    root, manifest = _engine_dir(tmp_path)
    assert read_manifest(root) == manifest
    verify(root, manifest, torch_version="2.11.0+cu130", compute_capability="9.0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"torch_version": "2.13.0+cpu"}, "built with torch 2.11.0"),
        ({"compute_capability": "8.9"}, "built for compute capability 9.0"),
    ],
)
def test_refuses_other_machine(tmp_path: Path, kwargs: dict, message: str) -> None:
    root, manifest = _engine_dir(tmp_path)
    with pytest.raises(EngineError, match=message):
        verify(root, manifest, **kwargs)


def test_refuses_tampered_and_missing_files(tmp_path: Path) -> None:
    root, manifest = _engine_dir(tmp_path)
    (root / "dit.safetensors").write_bytes(b"weights-bytez")
    with pytest.raises(EngineError, match=r"dit.safetensors does not match its sha256"):
        verify(root, manifest)
    (root / "dit.pt2").unlink()
    with pytest.raises(EngineError, match=r"dit\.pt2 is missing"):
        verify(root, manifest)


def test_stage_files_may_lie_in_subfolders_of_the_directory_only(tmp_path: Path) -> None:
    """Engine files in subfolders (the FA4 kernels an fa4 engine ships) are verified like the others."""
    root, manifest = _engine_dir(tmp_path)
    kernel = "fa4_kernels/dit/f1/fwd/ab12.o"
    (root / kernel).parent.mkdir(parents=True)
    (root / kernel).write_bytes(b"object")
    entry = dataclasses.replace(manifest.stages["dit"], files={kernel: sha256_file(root / kernel)})
    verify(root, dataclasses.replace(manifest, stages={"dit": entry}))
    (root / kernel).write_bytes(b"objecz")
    with pytest.raises(EngineError, match=r"file fa4_kernels/dit/f1/fwd/ab12\.o does not match its sha256"):
        verify(root, dataclasses.replace(manifest, stages={"dit": entry}))
    escape = dataclasses.replace(entry, files={"fa4_kernels/../../x.o": "0" * 64})
    with pytest.raises(EngineError, match=r"names a file outside the engine directory: fa4_kernels/\.\./\.\./x\.o"):
        verify(root, dataclasses.replace(manifest, stages={"dit": escape}))


def test_refuses_bad_manifests(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(EngineError, match="not an engine directory"):
        read_manifest(tmp_path)
    root, _ = _engine_dir(tmp_path)
    raw = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(EngineError, match="format 99"):
        read_manifest(root)
    del raw["build"]
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="malformed"):
        read_manifest(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_manifest(root)


def test_unknown_backend(tmp_path: Path) -> None:
    root, manifest = _engine_dir(tmp_path)
    bad = dataclasses.replace(manifest, stages={"dit": dataclasses.replace(manifest.stages["dit"], backend="onnx")})
    with pytest.raises(EngineError, match="unknown backend 'onnx'"):
        verify(root, bad)


def test_big_files_verify_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files of at least CHUNK_BYTES get one sha256 per chunk (verified on every core); a changed byte in any chunk
    or a changed size is refused; the chunk size travels with the manifest."""
    import fvrt.runtime.manifest as M

    monkeypatch.setattr(M, "CHUNK_BYTES", 8)
    root, manifest = _engine_dir(tmp_path)  # dit.safetensors: 13 bytes -> chunks of 8 + 5; dit.pt2: 12 -> 8 + 4
    files = [f for f, _, _ in M.manifest_files(manifest)]
    assert files == ["dit.pt2", "dit.safetensors"]
    chunked = dataclasses.replace(manifest, chunks=M.chunk_digests(root, files))
    assert chunked.chunks["dit.safetensors"]["size"] == 13 and len(chunked.chunks["dit.safetensors"]["sha256"]) == 2
    write_manifest(root, chunked)
    assert read_manifest(root) == chunked
    monkeypatch.setattr(M, "CHUNK_BYTES", 4)  # a reader with another default still uses the manifest's chunk size
    verify(root, read_manifest(root))
    data = bytearray((root / "dit.safetensors").read_bytes())
    data[10] ^= 1  # second chunk
    (root / "dit.safetensors").write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"dit\.safetensors does not match its sha256"):
        verify(root, chunked)
    (root / "dit.safetensors").write_bytes(b"weights-bytes!")
    with pytest.raises(EngineError, match=r"dit\.safetensors does not match its size"):
        verify(root, chunked)


def test_json_object_names_what_it_read() -> None:
    assert json_object('{"a": 1}', "x") == {"a": 1}
    with pytest.raises(EngineError, match=r"^cfg: not JSON \(Expecting value at line 1 column 1\)$"):
        json_object("nope", "cfg", EngineError)
    with pytest.raises(ValueError, match=r"^cfg: expected a JSON object, got list$"):
        json_object("[1]", "cfg")


def test_precision_table_is_what_builder_and_runtime_read() -> None:
    """One table: the builder's --precision / --text-precision choices, the low-bit layer classes and the runtime's
    compute-capability requirements all come from `fvrt.runtime.precision`."""
    import torch

    from fvrt.builder.build import PRECISIONS as BUILD_DTYPES
    from fvrt.builder.quant.fp8 import FP8Linear
    from fvrt.builder.quant.nvfp4 import NVFP4Linear
    from fvrt.runtime.precision import PRECISIONS, QUANTIZED, TEXT_PRECISIONS, min_compute_capability

    assert list(BUILD_DTYPES) == list(PRECISIONS) == ["fp32", "bf16", "fp8", "nvfp4"]
    assert BUILD_DTYPES["fp8"] is torch.bfloat16 and BUILD_DTYPES["fp32"] is torch.float32
    assert QUANTIZED == ("fp8", "nvfp4") and TEXT_PRECISIONS == ("bf16", "fp8")
    assert {FP8Linear.PRECISION, NVFP4Linear.PRECISION} == set(QUANTIZED)
    assert min_compute_capability("bf16") is None and min_compute_capability("nvfp4") == ((10, 0), "nvfp4")
    assert min_compute_capability("bf16", "fp8") == ((8, 9), "bf16 with FP8 attention")


def test_shape_contract() -> None:
    """Profiles and shape keys: the same arithmetic for the builder's engine shapes and the runtime's latents."""
    from fvrt.runtime.shapes import PRESET_PROFILES, Profile, key_stage, shape_key

    p = PRESET_PROFILES["1080p"]
    assert p.latent(1) == (16, 17, 30) and p.latent(2) == (16, 34, 60) and p.audio_latents == 126
    assert p.key(1) == shape_key("1080p", 1) == "1080p/s1" and p.key() == "1080p" and key_stage("x/s2") == 2
    assert Profile.from_json(p.name, json.loads(json.dumps(p.to_json()))) == p


def test_runtime_refuses_formats_it_cannot_execute(tmp_path: Path) -> None:
    """A TensorRT-RTX engine directory is a valid manifest, but fvrt-run executes torch-aot engines only: it says so
    when the directory is opened, before loading anything."""
    from fvrt.runtime.engine import EngineDir

    root, manifest = _engine_dir(tmp_path)
    rtx = dataclasses.replace(manifest.stages["dit"], backend="tensorrt-rtx")
    write_manifest(root, dataclasses.replace(manifest, stages={"dit": rtx}))
    with pytest.raises(EngineError, match="stage 'dit' is a tensorrt-rtx engine; fvrt-run executes torch-aot engines"):
        EngineDir.open(root)
