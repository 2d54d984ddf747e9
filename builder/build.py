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
from fvrt.builder.backends.aoti import ATTENTION_CHOICES
from fvrt.builder.backends.base import Backend, Finish
from fvrt.builder.checkpoint import LTXCheckpoint, load_checkpoint
from fvrt.builder.keys import checkpoint_identity, sha256_json, stage_keys, tool_versions
from fvrt.builder.precision import quantize_dit, quantize_text, stage_precision
from fvrt.builder.random_release import full_random_checkpoint, load_tiny_release, write_tiny_release
from fvrt.builder.request import (
    DEVICES,
    PRECISIONS,
    TARGET_CC_BACKENDS,
    BuildError,
    BuildRequest,
    Plan,
    validate,
)
from fvrt.builder.stages import ENGINE_NAMES, STAGE_GROUPS, engine_specs, loader_stages
from fvrt.builder.stages.base import EngineSpec
from fvrt.builder.stages.dit import BLOCK_ENGINE, is_block_engine
from fvrt.builder.tokenizer import copy_tokenizer
from fvrt.builder.verify import verify_built
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
    verify,
    write_manifest,
)
from fvrt.runtime.precision import QUANTIZED, TEXT_PRECISIONS
from fvrt.runtime.scratch import OWNER_RE, owner_tag, remove_stale

logger = logging.getLogger(__name__)

BUILD_LOG = "build.log"
ENGINE_DIR_MODE = 0o755

Log = Callable[[str], None]


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    up_to_date: bool
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    rebound: list[str] = field(default_factory=list)  # code reused, new weights file written


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
        need = loader_stages(ENGINE_NAMES if req.precision in QUANTIZED else plan.stages)
        log(f"building a full-size random LTX-{plan.version.value} on {plan.device} ({', '.join(sorted(need))})")
        return full_random_checkpoint(
            plan.version, dtype=plan.dtype, device=plan.device, seed=req.seed, materialize=need
        )
    log(f"loading {req.checkpoint}")
    return load_checkpoint(
        req.checkpoint, upsampler=req.upsampler, gemma=req.gemma, dtype=plan.dtype, device=plan.device
    )


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
    dst.parent.mkdir(parents=True, exist_ok=True)  # engine files may lie in subfolders (fa4_kernels/...)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _build_stage(
    plan: Plan,
    spec: EngineSpec,
    backend: Backend,
    tmp: Path,
    keys: tuple[str, str],
    old: Manifest | None,
    result: BuildResult,
    log: Log,
) -> Finish:
    """One engine: reuse it, rebind new weights to its code, or compile it. Returns the call that gives its
    entry: everything that reads `spec`'s model is done before this returns, so the caller may free the model;
    a compile still running in a worker process is waited for by that call (`Backend.start`)."""
    code_key, stage_key = keys
    prev = old.stages.get(spec.name) if old is not None else None
    out = Path(plan.request.out_dir)

    def keyed(entry: StageEntry) -> StageEntry:
        return replace(entry, extra={**entry.extra, "code_key": code_key, "stage_key": stage_key})

    if prev is not None and prev.extra.get("stage_key") == stage_key:
        _reuse(out, prev, tmp)
        result.reused.append(spec.name)
        log(f"{spec.name}: unchanged, reused")
        return lambda: prev
    if prev is not None and prev.extra.get("code_key") == code_key and backend.rebinds:
        _reuse(out, prev, tmp, weights=False)
        entry = keyed(backend.rebind(spec, tmp, prev))
        result.rebound.append(spec.name)
        log(f"{spec.name}: code unchanged, new weights written")
        return lambda: entry
    finish = backend.start(spec, tmp, precision=stage_precision(plan, spec), log=log)
    result.built.append(spec.name)
    if plan.request.verify:  # needs the model and the engine now: this stage waits for its compile
        entry = finish()
        entry = keyed(replace(entry, extra={**entry.extra, "verify": verify_built(spec, tmp, entry, plan.device, log)}))
        return lambda: entry
    return lambda: keyed(finish())


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
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{owner_tag()}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


SCRATCH_PREFIX = "fvrt-build-"


def _leftovers(out: Path) -> tuple[tuple[Path, re.Pattern[str]], ...]:
    """Where a build of `out` keeps work in progress, and the names it gives it (owner-tagged: `runtime.scratch`):
    the directory being built and the replaced one beside `out`, the scratch folder (tiny release, calibration
    data) in the temporary folder."""
    beside = re.compile(rf"\.{re.escape(out.name)}\.{OWNER_RE}\.(?:building|old)-[A-Za-z0-9_]+")
    scratch = re.compile(rf"{SCRATCH_PREFIX}{OWNER_RE}-[A-Za-z0-9_]+")
    return (out.parent, beside), (Path(tempfile.gettempdir()), scratch)


def remove_leftovers(out: Path, log: Log) -> None:
    """Remove what builds of `out` killed on this host (SIGKILL, out of memory) left behind."""
    for folder, pattern in _leftovers(out):
        for path in remove_stale(folder, pattern):
            log(f"removed {path}, left by a build that did not finish")


def _block_stage(name: str) -> str:
    """The stage an engine belongs to: a DiT block engine (one per layer group) to "dit_block"."""
    return BLOCK_ENGINE if is_block_engine(name) else name


def _kept_engines(plan: Plan, old: Manifest | None, key: Callable[[Sequence[str]], str]) -> list[str]:
    """A partial build (`--stages`) over an engine directory keeps the engines it does not build, provided they
    come from the same weights and options (the old directory's build key is the one this build would give for
    its stage list); otherwise it refuses, unless --force (which replaces the directory with the new engines
    only). Returns the stages kept."""
    if old is None or not plan.request.stages:
        return []
    old_stages = list(dict.fromkeys(_block_stage(n) for n in old.stages))
    kept = [n for n in old_stages if n not in plan.stages]
    if not kept or plan.request.force:
        return []
    ordered = [n for n in ENGINE_NAMES if n in old_stages]
    if key(ordered) != old.build_key:
        raise BuildError(
            f"--stages {','.join(plan.stages)}: {plan.request.out_dir} also holds {', '.join(kept)}, built from "
            "other weights or options; building only some engines would mix them. Build every engine (leave out "
            "--stages), build into another directory, or add --force to replace it with the named engines only"
        )
    return kept


def _keep(out: Path, old: Manifest, kept: Sequence[str], tmp: Path, result: BuildResult) -> None:
    """Carry the kept stages' engines (and, with text engines, the tokenizer) into the new directory."""
    stages = dict(result.manifest.stages)
    for name, entry in old.stages.items():
        if _block_stage(name) in kept:
            _reuse(out, entry, tmp)
            stages[name] = entry
            result.reused.append(name)
    assets = dict(result.manifest.assets)
    if set(STAGE_GROUPS["text_encoder"]) & set(kept) and not assets:
        for f, digest in old.assets.items():
            link_or_copy(out / f, tmp / f)
            assets[f] = digest
    order = {n: i for i, n in enumerate(ENGINE_NAMES)}
    ordered = dict(sorted(stages.items(), key=lambda kv: (order.get(_block_stage(kv[0]), 99), kv[0])))
    result.manifest = replace(result.manifest, stages=ordered, assets=assets)


def _build_env(plan: Plan, ckpt: LTXCheckpoint, ckpt_id: dict[str, Any]) -> BuildEnv:
    tools = tool_versions(plan.device)
    env = {"tensorrt_version": None, "compute_capability": tools["compute_capability"], **plan.backend.environment()}
    return BuildEnv(
        fvrt_version=fvrt.__version__,
        torch_version=torch.__version__,
        tensorrt_version=env["tensorrt_version"],
        gpu_name=tools["gpu"],
        compute_capability=env["compute_capability"],
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
    result = BuildResult(Path(req.out_dir), None, up_to_date=False)  # type: ignore[arg-type]
    ckpt = _load(plan, scratch, log)
    quant = quantize_dit(plan, ckpt, scratch, log) if req.precision in QUANTIZED else None
    text_quant = quantize_text(plan, ckpt, scratch, log) if req.text_precision != "bf16" else None
    specs = {s.name: s for s in engine_specs(ckpt, plan.profiles, device=plan.device, seed=req.seed)}
    last_use = {s: i for i, stage in enumerate(plan.stages) for s in loader_stages([stage])}
    finishes: dict[str, Finish] = {}
    for i, stage in enumerate(plan.stages):  # dit_block: one engine per layer group (e.g. bf16 and FP8 blocks)
        for name in [n for n in specs if is_block_engine(n)] if stage == "dit_block" else [stage]:
            keys = stage_keys(plan, name, ckpt.config, ckpt_id, specs[name])
            finishes[name] = _build_stage(plan, specs[name], plan.backend, tmp, keys, old, result, log)
        # full size: 12B Gemma + 19B DiT + the 1080p decode (--verify) do not fit 80 GB together
        _drop_stages(ckpt, [s for s, last in last_use.items() if last == i])
    stages: dict[str, StageEntry] = {}
    for name, finish in finishes.items():  # in stage order; with --jobs, waits for the workers' compiles
        entry = finish()
        if quant is not None and is_block_engine(name):
            entry = replace(entry, extra={**entry.extra, "quantization": quant})
        if text_quant is not None and name == "text_block":
            entry = replace(entry, extra={**entry.extra, "quantization": text_quant})
        stages[name] = entry
    assets = copy_tokenizer(plan, tmp, scratch, log) if set(STAGE_GROUPS["text_encoder"]) & set(plan.stages) else {}
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
        remove_leftovers(out, log)
        ckpt_id = checkpoint_identity(plan)
        tools = tool_versions(plan.device)

        def key(stages: Sequence[str]) -> str:
            return sha256_json(
                {"recipe": {**plan.recipe, "stages": list(stages)}, "checkpoint": ckpt_id, "tools": tools}
            )

        old = _existing(out)
        kept = _kept_engines(plan, old, key)
        build_key = key([n for n in ENGINE_NAMES if n in {*plan.stages, *kept}])
        if old is not None and old.build_key == build_key:
            log(f"{out}: up to date (build key {build_key[:12]}), nothing rebuilt")
            return BuildResult(out, old, up_to_date=True, reused=list(old.stages))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{owner_tag()}.building-", dir=out.parent))
        tmp.chmod(ENGINE_DIR_MODE)  # mkdtemp makes it owner-only
    except OSError as e:
        raise _os_error(e, out) from None
    lines: list[str] = []

    def tee(msg: str) -> None:
        lines.append(f"{time.perf_counter() - t0:8.1f}s  {msg}")
        log(msg)

    try:
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{owner_tag()}-") as scratch:
            result = _build_into(plan, tmp, Path(scratch), old, (build_key, ckpt_id), tee)
        if kept:
            assert old is not None
            _keep(out, old, kept, tmp, result)
            tee(f"kept {', '.join(kept)} from {out} (same weights and options)")
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
    except plan.backend.errors as e:  # e.g. TensorRT refused a graph: one line, nothing written
        raise BuildError(" ".join(str(e).split())) from None
    except RuntimeError as e:
        # torch's archive writer reports a short write as "enforce fail ... unexpected pos", without the errno
        if _space_left(out.parent, Path(tempfile.gettempdir())) < LOW_SPACE_BYTES:
            raise BuildError(f"disk full while building {out}; nothing was written") from e
        raise
    finally:
        plan.backend.close()  # compile workers (--jobs): stopped at once when the build failed
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# below this much free space where a build writes, a failed write is taken for a full disk (a failing write
# leaves at most the part of one record that did not fit)
LOW_SPACE_BYTES = 64 << 20


def _space_left(*folders: Path) -> int:
    """The least free space of the file systems holding `folders` (those that cannot be read count as full)."""
    free = []
    for folder in folders:
        try:
            free.append(shutil.disk_usage(folder).free)
        except OSError:
            free.append(0)
    return min(free)


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


__all__ = [
    "ATTENTION_CHOICES",
    "DEVICES",
    "ENGINE_NAMES",
    "PRECISIONS",
    "TARGET_CC_BACKENDS",
    "TEXT_PRECISIONS",
    "BuildError",
    "BuildRequest",
    "BuildResult",
    "build_engines",
    "describe",
    "link_or_copy",
    "validate",
]
