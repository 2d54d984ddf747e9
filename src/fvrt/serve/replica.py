"""One warm replica: a `Pipeline` over engines opened once, making one video at a time (the `--batch` path).

`Replica(source)` opens an engine directory or bundle (unpacked and verified once, see `fvrt.runtime.bundle`), with
the batch memory policy (the text encoder parked between prompts, copied back while each MP4 is finished), and makes
one warm-up video of the first profile, so that its first request pays for no engine load or CUDA-graph capture.
Engines this machine cannot run (another GPU, torch or format, a tampered file) are refused with one line kept in
`error`: the replica stays up and says so in its status instead of failing and being restarted in a loop.
`run(spec)` yields progress events and then the MP4's bytes. No Ray here: the Serve deployment wraps this class.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from fvrt.runtime.bundle import DEFAULT_CACHE, engine_source
from fvrt.runtime.cli import open_engines
from fvrt.runtime.manifest import read_manifest
from fvrt.runtime.media import Mp4Handoff
from fvrt.runtime.pipeline import Pipeline
from fvrt.runtime.sampler import PRESETS
from fvrt.runtime.tokenizer import TOKENIZER_DIR, PromptTokenizer
from fvrt.serve.requests import VideoSpec, write_image

logger = logging.getLogger("ray.serve")
WARMUP_PROMPT = "warm-up"
# the pipeline's progress stages, in order, and the one-step stages among them (the two denoising stages
# report each step)
STAGES = ("text encode", "stage 1", "upsample", "stage 2", "video decode", "audio decode", "mux")


def steps_of(preset: str) -> int:
    """The progress ticks of one generation: one per one-step stage, one per denoising step."""
    p = PRESETS[preset]
    return len(STAGES) - 2 + (len(p.stage_1) - 1) + (len(p.stage_2) - 1)


class Replica:
    def __init__(
        self,
        source: str | Path,
        *,
        device: str | None = None,
        cuda_graphs: bool = True,
        cache: str | Path = DEFAULT_CACHE,
        warmup: bool = True,
    ) -> None:
        self.error: str | None = None
        self.pipe: Pipeline | None = None
        self.profiles: dict[str, dict[str, Any]] = {}
        self.device = "?"
        self.warmup_s = 0.0
        self.work = Path(tempfile.mkdtemp(prefix="fvrt-replica-"))
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="fvrt-replica")  # one video at a time
        try:
            engine_dir = engine_source(source, cache)
            manifest = read_manifest(engine_dir)
            tokenizer = PromptTokenizer(engine_dir / TOKENIZER_DIR)
            engines = open_engines(engine_dir, device)
        except ValueError as e:  # EngineError, TokenizerError: one line, the replica stays up and says it
            self.error = f"engines refused: {e}"
            logger.error("fvrt replica pid=%d %s", os.getpid(), self.error)
            return
        self.profiles, self.device = manifest.profiles, str(engines.device)
        pipe = Pipeline(engines, tokenizer, cuda_graphs=cuda_graphs, memory="offload", prefetch_text=True)
        self.pipe = pipe
        if warmup:  # on the worker thread, as every later generation (CUDA graphs are captured there)
            t = time.perf_counter()
            self._worker.submit(self.generate, VideoSpec({"prompt": WARMUP_PROMPT}), lambda *_: None).result()
            self.warmup_s = time.perf_counter() - t
            logger.info(
                "fvrt replica pid=%d warm on %s (warm-up video %.2f s)", os.getpid(), self.device, self.warmup_s
            )

    @property
    def ready(self) -> bool:
        return self.pipe is not None

    def memory_bytes(self) -> int | None:
        """Device memory reserved by this replica's torch allocator (None on the CPU)."""
        if self.pipe is None or self.pipe.engines.device.type != "cuda":
            return None
        return int(torch.cuda.memory_reserved(self.pipe.engines.device))

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "ready": self.ready, "error": self.error, "device": self.device,
                "warmup_s": self.warmup_s, "memory_bytes": self.memory_bytes()}  # fmt: skip

    def generate(self, spec: VideoSpec, progress: Callable[[str, int, int], None]) -> tuple[bytes, dict[str, float]]:
        """One video: (MP4 bytes, stage timings with "mux"). The MP4 is encoded as `fvrt-run` does (the AAC while
        the video decodes), into this replica's scratch folder, and removed once read."""
        if self.pipe is None:
            raise RuntimeError(self.error or "the replica has no engines")
        name = uuid.uuid4().hex
        out = self.work / f"{name}.mp4"
        image = write_image(spec.image, self.work, name) if spec.image is not None else None
        mp4: Mp4Handoff | None = None
        pipe = self.pipe
        try:
            req = spec.job(self.profiles, out, image).req
            mp4 = Mp4Handoff(out, fps=req.fps, width=req.width, height=req.height, sample_rate=pipe.sample_rate)
            result = pipe(req, progress=progress, on_audio=mp4.on_audio, on_video=mp4.on_video, frames=False)
            progress("mux", 1, 1)
            t = time.perf_counter()
            mp4.finish()
            timings = {**result.timings, "mux": time.perf_counter() - t}
            return out.read_bytes(), timings
        except BaseException:
            if mp4 is not None:
                mp4.abort()
            raise
        finally:
            out.unlink(missing_ok=True)
            if image is not None:
                image.unlink(missing_ok=True)

    async def run(self, spec: VideoSpec) -> AsyncIterator[dict[str, Any]]:
        """Events of one generation: {"event": "started", "pid", "device", "at" (this replica's time.time())},
        {"event": "progress", "stage", "progress"} (a percentage), then {"event": "done", "mp4", "timings_s",
        "memory_bytes"} or {"event": "failed", "error"}."""
        yield {"event": "started", "pid": os.getpid(), "device": self.device, "at": time.time()}
        if self.pipe is None:
            yield {"event": "failed", "error": self.error}
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        total, ticks = steps_of(str(spec.fields.get("preset", "distilled"))), [0, None]

        def progress(stage: str, done: int, steps: int) -> None:
            if (stage, done) != ticks[1]:
                ticks[0], ticks[1] = ticks[0] + 1, (stage, done)
            pct = min(99, round(100 * ticks[0] / total))
            loop.call_soon_threadsafe(events.put_nowait, {"event": "progress", "stage": stage, "progress": pct})

        job = loop.run_in_executor(self._worker, self.generate, spec, progress)
        while not job.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait([getter, job], return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        try:
            data, timings = job.result()
        except ValueError as e:  # a request check (the ingress checks with the same engines' manifest first)
            yield {"event": "failed", "error": str(e)}
            return
        except Exception as e:
            logger.exception("fvrt replica pid=%d: generation failed", os.getpid())
            yield {"event": "failed", "error": f"generation failed: {type(e).__name__}: {e}".splitlines()[0]}
            return
        yield {"event": "done", "mp4": data, "timings_s": timings, "memory_bytes": self.memory_bytes()}

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        shutil.rmtree(self.work, ignore_errors=True)
