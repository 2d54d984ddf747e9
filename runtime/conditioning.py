# Ported from ltx_pipelines/utils/media_io.py (load_image_conditioning, preprocess, resize_and_center_crop;
# ltx-pipelines 1.0.0)
"""Image conditioning input: the first-frame image as the video encoder engine takes it.

As the official `load_image_conditioning`: decode (PIL, RGB channels of the file), re-compress as a single
H.264 frame (libx264, CRF 33, preset veryfast, yuv420p; the conditioning distribution the model was trained
on), resize bilinearly to cover the target and center-crop, scale to [-1, 1]. The encoded image then replaces
the tokens of latent frame 0 with denoise mask 1 - strength (see `sampler.initial_state`).
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_CRF = 33  # ltx_pipelines/utils/constants.py DEFAULT_IMAGE_CRF
IMAGE_PRESET = "veryfast"  # media_io.encode_single_frame


class ImageError(ValueError):
    """The conditioning image cannot be read; the message names the file and the reason."""


def read_image(path: str | Path) -> np.ndarray:
    """The image's pixels [H, W, 3] uint8, read-only (official `decode_image`: `np.array(Image.open(path))[..., :3]`;
    grey and palette images, which the official code cannot take, are converted to RGB first). A file is decoded
    once per process while it is unchanged (same size and modification time): validating a request and encoding
    its image at both pipeline stages read it once."""
    return _decoded(str(path), _stamp(path), None)


def _stamp(path: str | Path) -> tuple[int, int]:
    """(modification time, size) of the file: what keys `_decoded`'s cache to its contents."""
    try:
        stat = Path(path).stat()
    except OSError as e:
        raise ImageError(f"--image {path}: cannot read the image ({e})") from None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _decoded(path: str, stamp: tuple[int, int], crf: int | None) -> np.ndarray:
    """`path` decoded (crf None) or decoded and through `h264_round_trip(.., crf)`, read-only; `stamp` (mtime,
    size) keys the cache to the file's contents."""
    pixels = _decode(path) if crf is None else h264_round_trip(_decoded(path, stamp, None), crf)
    pixels.setflags(write=False)
    return pixels


def _decode(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("RGB", "RGBA"):
                img = img.convert("RGB")
            pixels = np.array(img)[..., :3]
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ImageError(f"--image {path}: cannot read the image ({e})") from None
    if pixels.ndim != 3 or pixels.shape[0] < 2 or pixels.shape[1] < 2:
        raise ImageError(f"--image {path}: expected a colour image of at least 2x2 pixels, got {pixels.shape}")
    return pixels


def h264_round_trip(pixels: np.ndarray, crf: int = IMAGE_CRF) -> np.ndarray:
    """Encode [H, W, 3] uint8 as one H.264 frame and decode it back (cropped to even H, W); crf 0 = no-op."""
    if crf == 0:
        return pixels
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=1, options={"crf": str(crf), "preset": IMAGE_PRESET})
        stream.height, stream.width = h, w
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:h, :w]), format="rgb24")
        out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode())
    with av.open(io.BytesIO(buf.getvalue())) as src:
        decoded = next(src.decode(next(s for s in src.streams if s.type == "video")))
        return decoded.to_ndarray(format="rgb24")


def resize_and_center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[H, W, 3] float -> [1, 3, 1, height, width]: bilinear resize (no antialiasing) so that the image covers
    the target, then a center crop."""
    x = pixels.permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
    src_h, src_w = x.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = math.ceil(src_h * scale), math.ceil(src_w * scale)  # ceil: never smaller than the target
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[:, :, top : top + height, left : left + width].unsqueeze(2)


def image_input(
    path: str | Path, height: int, width: int, *, dtype: torch.dtype, device: torch.device, crf: int = IMAGE_CRF
) -> torch.Tensor:
    """The video encoder's input for the image at `path`: [1, 3, 1, height, width] in [-1, 1], `dtype`."""
    pixels = torch.tensor(_decoded(str(path), _stamp(path), crf), dtype=torch.float32, device=device)
    return (resize_and_center_crop(pixels, height, width) / 127.5 - 1.0).to(dtype)
