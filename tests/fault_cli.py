"""`fvrt-run` with a stand-in pipeline, run as a subprocess by the fault suite (tests/test_faults.py).

Everything of the command line is the real one (option checks, output checks, the MP4 writer, signals, exit
codes); only the engines, the tokenizer and the pipeline are replaced, so that a run takes a second and a fault
can be injected where it matters:
- the prompt "fail at run time" makes the pipeline raise after the checks passed (a run-time failure);
- with FVRT_FAULT_PAUSE=FILE the pipeline writes FILE once the MP4 writer holds its partial file, then sleeps,
  so that the test can signal the process while the MP4 is being written.
The stand-in frames and audio are seeded noise: the same request gives the same MP4.

    python tests/fault_cli.py ENGINE_DIR [fvrt-run options]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from fvrt.runtime import cli
from fvrt.runtime.media import rgb_to_yuv420p
from fvrt.runtime.pipeline import Output

SAMPLE_RATE = 48000
RUN_TIME_FAILURE = "fail at run time"
PAUSE_SECONDS = 120


class StandInPipeline:
    def __init__(self, engines: Any, tokenizer: Any, **_: Any) -> None:
        self.sample_rate = SAMPLE_RATE
        self.graphs = SimpleNamespace(enabled=False)

    def __call__(
        self, req: Any, *, progress: Any = None, on_video: Any = None, on_audio: Any = None, frames: bool = True
    ) -> Output:
        if req.prompt == RUN_TIME_FAILURE:
            raise RuntimeError("the stand-in pipeline failed as asked")
        rng = np.random.default_rng(req.seed % 2**32)
        rgb = rng.integers(0, 256, (req.frames, req.height, req.width, 3), dtype=np.uint8)
        audio = rng.uniform(-0.5, 0.5, (2, int(SAMPLE_RATE * req.frames / req.fps))).astype(np.float32)
        if on_audio is not None:  # as the pipeline does: the audio before the video
            on_audio(audio)
        if on_video is not None:
            on_video(rgb_to_yuv420p(torch.from_numpy(rgb)).numpy())
        pause = os.environ.get("FVRT_FAULT_PAUSE")
        if pause:
            Path(pause).write_text(str(os.getpid()))
            time.sleep(PAUSE_SECONDS)
        return Output(rgb if frames else None, audio, SAMPLE_RATE, float(req.fps), {"pipeline_total": 0.0})


def main() -> None:
    cli.open_engines = lambda engine_dir, device: SimpleNamespace(device=torch.device(device or "cpu"))
    cli.PromptTokenizer = lambda folder: lambda prompt: None
    cli.Pipeline = StandInPipeline
    cli.main(args=sys.argv[1:], prog_name="fvrt-run")


if __name__ == "__main__":
    main()
