"""Engine bundles: one file to ship an engine directory to the nodes that serve it.

`fvrt-pack ENGINE_DIR bundle.tar` writes an uncompressed tar (weights barely compress) holding `manifest.json`
first, then every file the manifest names (engines, weights, tokenizer), after checking each against its sha256.
`fvrt-run` and `fvrt-serve` accept a bundle where they accept an engine directory: `unpack` extracts it once into a
cache folder named by the sha256 of its manifest and verifies every file's sha256 before it is used; a later start
finds it there. The engines are then opened as usual, which checks them against this machine again (torch version,
device, GPU compute capability) and refuses, with one line, a bundle built for another GPU, torch or format.
Standard library only, like `manifest.py`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
from pathlib import Path

import click

from fvrt.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    EngineError,
    Manifest,
    _inside,
    json_object,
    manifest_files,
    read_manifest,
    verify,
)

PROG = "fvrt-pack"
EXIT_USAGE = 2
DEFAULT_CACHE = Path("~/.cache/fvrt/bundles")  # unpacked bundles, one folder per manifest hash
KEY_CHARS = 16  # of the manifest's sha256 in the cache folder name: 64 bits, no collision among a node's bundles
_COPY_CHUNK = 1 << 24


def pack(engine_dir: str | Path, bundle: str | Path) -> tuple[Path, int]:
    """Write the bundle of `engine_dir` (verified first) atomically; returns (path, number of files)."""
    root, out = Path(engine_dir), Path(bundle)
    manifest = read_manifest(root)
    verify(root, manifest)
    files = [f for f, _, _ in manifest_files(manifest)]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(root / MANIFEST_NAME, arcname=MANIFEST_NAME, recursive=False)
            for f in files:
                tar.add(_inside(root, f), arcname=f, recursive=False)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, len(files) + 1


def read_bundle_manifest(bundle: str | Path) -> tuple[Manifest, str]:
    """The manifest of a bundle and the sha256 of its bytes, without unpacking the rest."""
    path = Path(bundle)
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST_NAME or not first.isfile():
                raise EngineError(f"{path}: not an fvrt bundle ({MANIFEST_NAME} is not its first member)")
            reader = tar.extractfile(first)
            raw = reader.read() if reader is not None else b""
    except (tarfile.TarError, OSError) as e:
        raise EngineError(f"{path}: not an fvrt bundle ({e})") from None
    try:
        obj = json_object(raw.decode(), f"{path}: {MANIFEST_NAME}", EngineError)
    except UnicodeDecodeError:
        raise EngineError(f"{path}: {MANIFEST_NAME} is not text") from None
    if obj.get("format_version") != FORMAT_VERSION:
        raise EngineError(
            f"{path}: manifest format {obj.get('format_version')!r}, this fvrt reads format {FORMAT_VERSION}"
        )
    return Manifest.from_dict(obj), hashlib.sha256(raw).hexdigest()


def unpack(bundle: str | Path, cache: str | Path = DEFAULT_CACHE) -> Path:
    """The engine directory of a bundle: unpacked into `cache/<manifest hash>` and verified the first time (every
    member must be a regular file the manifest names, every file must match its sha256), found there afterwards.
    Concurrent unpackers (replicas of one node) each extract to a temporary folder; the first rename wins."""
    path = Path(bundle)
    manifest, digest = read_bundle_manifest(path)
    cache = Path(cache).expanduser()
    dest = cache / digest[:KEY_CHARS]
    if (dest / MANIFEST_NAME).is_file():
        return dest
    names = {f for f, _, _ in manifest_files(manifest)} | {MANIFEST_NAME}
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineError(f"bundle cache {cache}: cannot create it ({e.strerror})") from None
    tmp = cache / f".{dest.name}.{os.getpid()}.partial"
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name not in names or not member.isfile():
                    raise EngineError(f"{path}: member {member.name} is not a file of its manifest")
                target = _inside(tmp, member.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                with target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
        verify(tmp, manifest)
        try:
            tmp.rename(dest)
        except OSError:  # another process unpacked it first
            if not (dest / MANIFEST_NAME).is_file():
                raise
    except (tarfile.TarError, OSError) as e:
        raise EngineError(f"{path}: cannot unpack it into {cache} ({getattr(e, 'strerror', None) or e})") from None
    except EngineError as e:
        raise EngineError(str(e).replace(str(tmp), str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def engine_source(source: str | Path, cache: str | Path = DEFAULT_CACHE) -> Path:
    """An engine directory as given, or the unpacked directory of a bundle file."""
    path = Path(source)
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise EngineError(f"engine directory {path} is a file, not a directory nor an fvrt bundle")
        return unpack(path, cache)
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
def main(engine_dir: Path, bundle: Path) -> None:
    """Pack ENGINE_DIR (manifest, engines, weights, tokenizer; every sha256 checked) into one BUNDLE file that
    `fvrt-serve` and `fvrt-run` accept in place of the directory."""
    try:
        if bundle.is_dir() or not bundle.parent.is_dir():
            raise ValueError(f"{bundle}: must be a file in an existing directory")
        out, count = pack(engine_dir, bundle)
        _, digest = read_bundle_manifest(out)
    except (ValueError, OSError) as e:
        click.echo(f"{PROG}: error: {getattr(e, 'strerror', None) or e}", err=True)
        sys.exit(EXIT_USAGE)
    size = out.stat().st_size
    click.echo(f"wrote {out} ({count} files, {size / 1e6:.1f} MB, manifest sha256 {digest[:KEY_CHARS]})")


if __name__ == "__main__":
    main()
