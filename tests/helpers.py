"""Shared test utilities: one tolerance helper for every parity check."""

from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "output") -> None:
    """Relative-error check that reports the mismatch: relative error, max abs diff and its index."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: non-finite values in output")
    if expected.abs().max() == 0:
        raise AssertionError(f"{what}: reference is all zeros; the check would prove nothing")
    err = rel_error(actual, expected)
    if err > tol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; max |diff| {diff.max().item():.3e} at {idx} "
            f"(actual {actual[idx].item():.6g}, expected {expected[idx].item():.6g})"
        )
