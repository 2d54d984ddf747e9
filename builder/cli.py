"""`fvrt-build`: a thin click wrapper over `fvrt.builder.build.build_engines`.

Progress goes to stdout; a bad input (or a full disk) is one line on stderr and exit code 2, never a traceback,
and never a half-written engine directory. An unexpected internal failure is one line and exit code 1
(`--debug` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from fvrt.builder.build import (
    ATTENTION_CHOICES,
    DEVICES,
    PRECISIONS,
    TARGET_CC_BACKENDS,
    TEXT_PRECISIONS,
    BuildError,
    BuildRequest,
    build_engines,
    describe,
)
from fvrt.runtime.scratch import interrupt_exit_code, interrupt_name, polite_signals_interrupt

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Official single-file .safetensors checkpoint.")
@click.option("--upsampler", type=click.Path(path_type=Path), help="Latent upsampler .safetensors (with --checkpoint).")
@click.option(
    "--gemma", type=click.Path(path_type=Path), help="Gemma-3 folder, Hugging Face layout (with --checkpoint)."
)
@click.option("--random", "random_size", help="Random weights instead of a checkpoint: tiny (CPU default) or full.")
@click.option("--version", "model_version", default="2.3", show_default=True, help="Random builds: 2.0 or 2.3.")
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    help="Resolution profile: a preset (1080p, 720p, 1024x1536, 512x768, tiny) or HxWxF[@FPS]; repeatable. "
    "Default: tiny for --random tiny, else 1080p.",
)
@click.option("--backend", default="torch-aot", show_default=True, help="torch-aot | tensorrt | tensorrt-rtx")
@click.option("--precision", default="fp32", show_default=True, help=" | ".join(PRECISIONS))
@click.option("--device", default="cpu", show_default=True, help=" | ".join(DEVICES))
@click.option(
    "--stages", multiple=True, help="Engines to build (default all; 'dit' = the four DiT engines); repeatable."
)
@click.option(
    "--attention",
    default="default",
    show_default=True,
    help=f"torch-aot CUDA SDPA: {' | '.join(ATTENTION_CHOICES)}; TensorRT: default | decomposable (bf16 attention "
    "without a fused kernel is lowered to MatMul-Softmax-MatMul instead of failing the build).",
)
@click.option(
    "--target-cc",
    "target_ccs",
    multiple=True,
    help=f"{' | '.join(TARGET_CC_BACKENDS)}: GPU compute capability to compile for (e.g. 8.9, 12.0, SM120); "
    "repeatable or comma-separated. Default 8.9,12.0.",
)
@click.option(
    "--cxx",
    default=None,
    help="torch-aot: C++ compiler of the AOTInductor wrapper (name or path; also $FVRT_CXX). Default: the first of "
    "$CXX, g++, c++, g++-N (newest first), clang++ whose libraries load here (checked once, then cached).",
)
@click.option(
    "--calib-prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="fp8 / nvfp4: calibration prompts file (default calib_data/prompts.txt).",
)
@click.option("--calib-count", default=8, show_default=True, type=int, help="fp8 / nvfp4: calibration pipeline runs.")
@click.option(
    "--calib-images",
    type=click.Path(path_type=Path),
    default=None,
    help="fp8 / nvfp4: folder of PNG images for the image-to-video calibration runs (default: images/ beside the "
    "prompts file).",
)
@click.option(
    "--text-precision",
    type=click.Choice(list(TEXT_PRECISIONS)),
    default="bf16",
    show_default=True,
    help="Precision of the Gemma decoder layers (text_block); fp8 calibrates on every prompt of --calib-prompts.",
)
@click.option(
    "--calib-method",
    type=click.Choice(["modelopt", "hooks"]),
    default="modelopt",
    show_default=True,
    help="fp8 / nvfp4: amax collection by nvidia-modelopt's max calibration, or by forward hooks computing the same "
    "statistic (for machines without ModelOpt).",
)
@click.option(
    "--verify",
    is_flag=True,
    help="torch-aot: run every newly built engine against eager PyTorch on fresh sample inputs and record the "
    "relative errors in the manifest (extra.verify).",
)
@click.option(
    "--conv-layout",
    default="auto",
    show_default=True,
    help="torch-aot: how the video VAE engines store their 3-D conv weights: auto | ncdhw | ndhwc. auto = ndhwc on "
    "CUDA (cuDNN then runs every conv channels-last, without its per-conv layout transposes), ncdhw on the CPU.",
)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=int,
    help="torch-aot: compile processes. Above 1, each engine's AOTInductor compile runs in one of that many "
    "worker processes while the next engines export; 1 compiles in this process.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of random weights and sample inputs.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR even if it is not an engine directory.")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
def fvrt_build(
    out_dir: Path,
    checkpoint: Path | None,
    upsampler: Path | None,
    gemma: Path | None,
    random_size: str | None,
    model_version: str,
    profiles: tuple[str, ...],
    backend: str,
    precision: str,
    device: str,
    stages: tuple[str, ...],
    attention: str,
    target_ccs: tuple[str, ...],
    cxx: str | None,
    calib_prompts: Path | None,
    calib_count: int,
    calib_images: Path | None,
    text_precision: str,
    calib_method: str,
    verify: bool,
    conv_layout: str,
    jobs: int,
    seed: int,
    force: bool,
    debug: bool,
) -> None:
    """Build an engine directory OUT_DIR (manifest.json + one engine per stage) from a checkpoint or random weights."""
    request = BuildRequest(
        out_dir=out_dir,
        checkpoint=checkpoint,
        upsampler=upsampler,
        gemma=gemma,
        random=random_size,
        version=model_version,
        profiles=profiles,
        backend=backend,
        precision=precision,
        device=device,
        stages=tuple(s for group in stages for s in group.split(",") if s),
        force=force,
        seed=seed,
        attention=attention,
        target_ccs=tuple(c for group in target_ccs for c in group.split(",") if c.strip()),
        cxx=cxx,
        calib_prompts=calib_prompts,
        calib_count=calib_count,
        calib_images=calib_images,
        calib_method=calib_method,
        text_precision=text_precision,
        verify=verify,
        conv_layout=conv_layout,
        jobs=jobs,
    )
    result = build_engines(request, log=lambda msg: click.echo(msg))
    click.echo(describe(result))
    click.echo(f"engine directory: {result.path}")


class _Failed(Exception):
    """A failed build: the one line for stderr (without the `fvrt-build: error:` prefix) and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(" ".join(str(message).split()))
        self.code = code


def _interrupted(e: KeyboardInterrupt) -> _Failed:
    return _Failed(f"interrupted ({interrupt_name(e)}); nothing was written", interrupt_exit_code(e))


def _build(args: list[str]) -> None:
    """Run the command; every failure but an internal one under `--debug` leaves as a `_Failed`."""
    from fvrt.builder.checkpoint import CheckpointError
    from fvrt.runtime.manifest import EngineError

    try:
        with polite_signals_interrupt():  # SIGTERM / SIGHUP clean up as Ctrl-C does
            fvrt_build.main(args=args, prog_name="fvrt-build", standalone_mode=False)
    except click.exceptions.Exit as e:  # --help
        sys.exit(e.exit_code)
    except click.ClickException as e:
        raise _Failed(e.format_message(), EXIT_BAD_INPUT) from None
    except click.Abort as e:  # click turns a KeyboardInterrupt inside the command into Abort
        raise _interrupted(e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else KeyboardInterrupt()) from None
    except (BuildError, CheckpointError, EngineError) as e:
        raise _Failed(str(e), EXIT_BAD_INPUT) from None
    except KeyboardInterrupt as e:
        raise _interrupted(e) from None
    except Exception as e:
        if "--debug" in args:
            raise
        raise _Failed(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", EXIT_INTERNAL
        ) from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line on stderr and exit 2 for bad input, 1 for internal errors."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _build(sys.argv[1:] if argv is None else argv)
    except _Failed as e:
        click.echo(f"fvrt-build: error: {e}", err=True)
        if argv is None:
            # The console script (tests call main(argv) in their own process) leaves with os._exit: a torch archive
            # writer that failed mid-file (a full disk) throws again from its C++ destructor when the interpreter
            # frees it, which would abort the process (exit 134) after the error line. Everything the build wrote
            # is removed by then; nothing else is left to run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code)
        sys.exit(e.code)


if __name__ == "__main__":
    main()
