"""Draw the reference images of the calibration set (deterministic; run from the repo root:
`python calib_data/make_images.py`). No external data: every pixel is computed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "images"
W, H = 960, 544  # the 1080p profile's stage-1 size; the runtime resizes to cover any profile


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    return x / (W - 1), y / (H - 1)


def sunset() -> Image.Image:
    """Sky gradient, a sun disc on the horizon and its reflection on water."""
    x, y = _grid()
    horizon = 0.62
    sky = np.stack([1.0 - 0.3 * y, 0.45 + 0.3 * y, 0.35 + 0.5 * (1 - y)], -1)
    water = np.stack([0.1 + 0.2 * y, 0.15 + 0.2 * y, 0.35 + 0.2 * y], -1)
    img = np.where((y < horizon)[..., None], sky, water)
    d = np.hypot((x - 0.5) * W / H, y - horizon)
    img = np.where((d < 0.12)[..., None] & (y < horizon)[..., None], [1.0, 0.85, 0.4], img)
    ripple = (np.sin(y * 400) > 0.6) & (np.abs(x - 0.5) < 0.08 * (1 - (y - horizon))) & (y >= horizon)
    img = np.where(ripple[..., None], [1.0, 0.75, 0.35], img)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def sphere_on_checker() -> Image.Image:
    """A lit sphere on a checkerboard floor: hard edges, shading and a cast shadow."""
    x, y = _grid()
    checker = ((np.floor(x * 16) + np.floor(y * 9)) % 2).astype(np.float32)
    img = np.stack([0.25 + 0.5 * checker] * 3, -1)
    cx, cy, r = 0.5, 0.5, 0.22
    dx, dy = (x - cx) * W / H, y - cy
    shadow = np.hypot(dx - 0.08, (dy - 0.25) * 3) < r * 0.9
    img = np.where(shadow[..., None], img * 0.4, img)
    inside = np.hypot(dx, dy) < r
    nz = np.sqrt(np.clip(r**2 - dx**2 - dy**2, 0, None)) / r
    light = np.clip(0.2 + 0.8 * (nz * 0.7 - dx / r * 0.3 - dy / r * 0.4), 0, 1)
    sphere = np.stack([0.9 * light, 0.2 * light, 0.15 * light], -1)
    img = np.where(inside[..., None], sphere, img)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def text_card() -> Image.Image:
    """White title text on a dark blue card: text on screen."""
    img = Image.new("RGB", (W, H), (20, 30, 70))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=96)
    draw.text((W // 2, H // 2 - 50), "FVRT", fill=(255, 255, 255), font=font, anchor="mm")
    draw.text(
        (W // 2, H // 2 + 60),
        "calibration 2026",
        fill=(230, 200, 90),
        font=ImageFont.load_default(size=48),
        anchor="mm",
    )
    return img


def face_shapes() -> Image.Image:
    """A flat cartoon face (person close-up): skin disc, eyes, mouth, hair block."""
    img = Image.new("RGB", (W, H), (120, 170, 210))
    d = ImageDraw.Draw(img)
    d.ellipse((330, 60, 630, 460), fill=(235, 190, 160))
    d.rectangle((320, 40, 640, 150), fill=(70, 40, 20))
    for ex in (410, 550):
        d.ellipse((ex - 28, 220, ex + 28, 260), fill=(255, 255, 255))
        d.ellipse((ex - 12, 228, ex + 12, 252), fill=(40, 60, 30))
    d.arc((400, 300, 560, 400), 20, 160, fill=(150, 40, 40), width=10)
    d.rectangle((300, 470, 660, 544), fill=(40, 90, 60))
    return img


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, fn in (
        ("sunset", sunset),
        ("sphere_on_checker", sphere_on_checker),
        ("text_card", text_card),
        ("face_shapes", face_shapes),
    ):
        fn().save(OUT / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()
