"""Signal-quality measures shared by the tests and the benchmark (numpy only)."""

from __future__ import annotations

import numpy as np


def psnr(actual: np.ndarray, expected: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf when equal); uint8 frames by default."""
    mse = float(((actual.astype(np.float64) - expected.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def snr(actual: np.ndarray, expected: np.ndarray) -> float:
    """Signal-to-noise ratio of `actual` against `expected` in dB (inf when equal)."""
    noise = float(((actual.astype(np.float64) - expected.astype(np.float64)) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((expected.astype(np.float64) ** 2).sum()) / noise)
