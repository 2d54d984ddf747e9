"""An HTTP request body -> the checked job the replicas run, through the CLI's own checks and messages.

The body is a JSON object with the keys of a `fvrt-run --batch` line, less the paths: "prompt" (required), "seed",
"preset", "height", "width", "frames", "fps", "image_strength" and "image" (a base64 PNG or JPEG, optionally a
`data:` URL). Every check `fvrt-run` makes before any work is made here, with its one-line message (a 400): the
body's size and JSON, unknown keys, value types, the shape against the engines' profiles, the preset, the image.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvrt.runtime.cli import Job, line_job, parse_line
from fvrt.runtime.pipeline import DEFAULT_SEED

API_KEYS = ("prompt", "seed", "preset", "height", "width", "frames", "fps", "image", "image_strength")
WHERE = "request"  # the prefix of every message (the CLI says "stdin line N")
DEFAULT_MAX_BODY_BYTES = 16 << 20  # a 1080p PNG is ~3-6 MB, base64 adds a third
DEFAULTS: dict[str, Any] = {"image": None, "image_strength": 1.0, "seed": DEFAULT_SEED, "preset": "distilled"}
DEFAULTS.update({"height": None, "width": None, "frames": None, "fps": None})


class BadRequest(ValueError):
    """A request that fails its checks: HTTP 400 with this one line; nothing is queued."""


@dataclass(frozen=True)
class VideoSpec:
    """What a replica needs to run one checked request: the JSON keys (shape filled in) and the image bytes."""

    fields: dict[str, Any]
    image: bytes | None = None

    def job(self, profiles: dict[str, dict[str, Any]], output: Path, image_path: Path | None) -> Job:
        """The checked `fvrt-run` job writing `output`; the image bytes must already be at `image_path`."""
        line = {**self.fields, "output": str(output), "image": str(image_path) if image_path else None}
        return line_job(profiles, DEFAULTS, WHERE, parse_line(json.dumps(line), WHERE))


def decode_image(value: Any) -> bytes:
    """The bytes of the "image" value: base64, or a data URL."""
    if not isinstance(value, str):
        raise BadRequest(f"{WHERE}: 'image' must be a base64 string, got {json.dumps(value)[:40]}")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{WHERE}: 'image' is not base64 ({e})") from None
    if not data:
        raise BadRequest(f"{WHERE}: 'image' is empty")
    return data


def write_image(data: bytes, folder: Path, name: str) -> Path:
    """The image bytes in a file of `folder` (the pipeline reads images from files)."""
    path = folder / f".{name}.{os.getpid()}.image"
    path.write_bytes(data)
    return path


def check_body(body: bytes, profiles: dict[str, dict[str, Any]], scratch: Path, name: str) -> VideoSpec:
    """The checked spec of a request body, or BadRequest with the CLI's message. `scratch`: a folder where the
    image is written for its check (removed after)."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"{WHERE}: not JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"{WHERE}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(API_KEYS))
    if unknown:
        raise BadRequest(f"{WHERE}: unknown key '{unknown[0]}' (keys: {', '.join(API_KEYS)})")
    image = decode_image(obj["image"]) if obj.get("image") is not None else None
    fields = {k: v for k, v in obj.items() if k != "image"}
    spec = VideoSpec(fields, image)
    image_path = write_image(image, scratch, name) if image is not None else None
    try:
        job = spec.job(profiles, scratch / f"{name}.mp4", image_path)
    except ValueError as e:
        message = str(e).replace(f"--image {image_path}", "--image (the uploaded image)") if image_path else str(e)
        raise BadRequest(message) from None
    finally:
        if image_path is not None:
            image_path.unlink(missing_ok=True)
    r = job.req  # the shape as run (filled in from the profiles): what the video object reports
    filled = {"height": r.height, "width": r.width, "frames": r.frames, "fps": r.fps, "seed": r.seed}
    return VideoSpec({**fields, **filled, "preset": r.preset, "image_strength": r.image_strength}, image)
