"""Engine bundles: `fvrt-pack` writes one verified file; unpacking is once per manifest hash, checks every member
and sha256, and refuses, with one line, a bundle that is not one, is tampered with, or has another format."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fvrt.runtime.bundle import engine_source, pack, read_bundle_manifest, unpack
from fvrt.runtime.manifest import (
    FORMAT_VERSION,
    BuildEnv,
    EngineError,
    Manifest,
    StageEntry,
    TensorSpec,
    read_manifest,
    sha256_file,
    write_manifest,
)


def _engine_dir(root: Path) -> Path:
    root.mkdir()
    (root / "tokenizer").mkdir()
    (root / "dit.pt2").write_bytes(b"engine-bytes")
    (root / "dit.safetensors").write_bytes(b"weights-bytes")
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / "stray.log").write_text("not in the manifest: not shipped")
    spec = TensorSpec("video", "float32", {"tiny": [1, 8, 128]})
    entry = StageEntry("dit", "torch-aot", "dit.pt2", sha256_file(root / "dit.pt2"), "fp32", [spec], [spec],
                       weights="dit.safetensors", weights_sha256=sha256_file(root / "dit.safetensors"))  # fmt: skip
    env = BuildEnv("0.1.0", "2.13.0", None, None, None, "2.3", "ab" * 32)
    assets = {"tokenizer/tokenizer.json": sha256_file(root / "tokenizer" / "tokenizer.json")}
    profiles = {"tiny": {"height": 128, "width": 192, "frames": 17, "fps": 24}}
    write_manifest(root, Manifest(FORMAT_VERSION, profiles, {"dit": entry}, env, {}, assets))
    return root


def test_pack_then_unpack_once(tmp_path: Path) -> None:
    src = _engine_dir(tmp_path / "engines")
    bundle, count = pack(src, tmp_path / "b.tar")
    assert count == 4  # manifest, engine, weights, tokenizer; not the stray file
    with tarfile.open(bundle) as tar:
        assert tar.getnames()[0] == "manifest.json" and "stray.log" not in tar.getnames()
    manifest, digest = read_bundle_manifest(bundle)
    assert manifest == read_manifest(src) and digest == sha256_file(src / "manifest.json")

    out = unpack(bundle, tmp_path / "cache")
    assert out.name == digest[:16] and (out / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert read_manifest(out) == manifest
    (out / "marker").write_text("")  # a second start finds it unpacked
    assert engine_source(bundle, tmp_path / "cache") == out and (out / "marker").exists()
    assert engine_source(src, tmp_path / "cache") == src  # a directory is used as it is
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_pack_refuses_a_tampered_directory(tmp_path: Path) -> None:
    src = _engine_dir(tmp_path / "engines")
    (src / "dit.pt2").write_bytes(b"other")
    with pytest.raises(EngineError, match="does not match its sha256"):
        pack(src, tmp_path / "b.tar")
    assert not (tmp_path / "b.tar").exists()


def _retar(bundle: Path, out: Path, edit: dict[str, bytes]) -> Path:
    """A copy of `bundle` with some members' bytes replaced (a tampered bundle)."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for m in src:
            data = edit.get(m.name, src.extractfile(m).read())
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return out


def test_unpack_refuses_tampered_and_foreign_bundles(tmp_path: Path) -> None:
    bundle, _ = pack(_engine_dir(tmp_path / "engines"), tmp_path / "b.tar")
    cache = tmp_path / "cache"
    with pytest.raises(EngineError, match=r"dit\.pt2 does not match its sha256"):
        unpack(_retar(bundle, tmp_path / "t.tar", {"dit.pt2": b"evil"}), cache)
    raw = json.loads(read_bundle_manifest(bundle)[0].to_json())
    other = json.dumps({**raw, "format_version": FORMAT_VERSION + 1}).encode()
    with pytest.raises(EngineError, match=f"manifest format {FORMAT_VERSION + 1}, this fvrt reads format"):
        unpack(_retar(bundle, tmp_path / "f.tar", {"manifest.json": other}), cache)
    with tarfile.open(bundle) as src, tarfile.open(tmp_path / "x.tar", "w") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        extra = tarfile.TarInfo("../escape")
        dst.addfile(extra)
    with pytest.raises(EngineError, match=r"member \.\./escape is not a file of its manifest"):
        unpack(tmp_path / "x.tar", cache)
    (tmp_path / "n.tar").write_bytes(b"not a tar")
    with pytest.raises(EngineError, match="not an fvrt bundle"):
        unpack(tmp_path / "n.tar", cache)
    assert not cache.exists() or not list(cache.iterdir())  # nothing left behind
    assert not (tmp_path / "escape").exists()


def test_fvrt_pack_cli(tmp_path: Path) -> None:
    src = _engine_dir(tmp_path / "engines")
    cmd = [sys.executable, "-m", "fvrt.runtime.bundle"]
    ok = subprocess.run([*cmd, str(src), str(tmp_path / "b.tar")], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith(f"wrote {tmp_path / 'b.tar'} (4 files"), ok.stderr
    bad = subprocess.run([*cmd, str(tmp_path / "none"), str(tmp_path / "c.tar")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "fvrt-pack: error: engine directory" in bad.stderr


def test_fvrt_run_takes_a_bundle_and_refuses_a_bad_one_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "n.tar").write_bytes(b"not a tar")
    cmd = [sys.executable, "-m", "fvrt.runtime.cli", str(tmp_path / "n.tar"), "--prompt", "x"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    line = f"fvrt-run: error: engine directory {tmp_path / 'n.tar'} is a file, not a directory nor an fvrt bundle"
    assert done.stderr == line + "\n"
