"""The precision contract: every precision an engine directory can hold, in one table read by builder and runtime.

A manifest stage's `precision` is one of `PRECISIONS`. The builder takes `--precision` (the DiT, and the dtype of
every other engine) and `--text-precision` (the Gemma decoder layers) from this table; the runtime takes from it
the GPU an engine needs. Low-bit precisions quantise the Linear layers of the engines they name (`quantizes`)
after calibration; every other engine of such a build is the `dtype` engine. Imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """One precision.

    name: the flag value and the manifest's `precision`. dtype: torch dtype name of the activations and of every
    tensor not quantised. min_cc: the oldest GPU compute capability with the tensor-core format (None: any; on the
    CPU the low-bit layers run through their exact emulation, which is how the tiny tests run them). quantizes:
    the engines whose Linear layers it quantises (empty: a plain dtype); calibrated: its scales come from
    calibration runs over the calibration prompts. text: `--text-precision` takes it (the Gemma decoder layers).
    """

    name: str
    dtype: str
    min_cc: tuple[int, int] | None = None
    quantizes: tuple[str, ...] = ()
    calibrated: bool = False
    text: bool = False

    @property
    def low_bit(self) -> bool:
        return bool(self.quantizes)


FP8_MIN_CC = (8, 9)  # FP8 tensor cores: Ada / Hopper; also what FP8 attention (`--attention fp8`) needs
PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", "float32"),
    "bf16": Precision("bf16", "bfloat16", text=True),
    # E4M3 weights and static per-tensor E4M3 activations: Ada / Hopper tensor cores (8.9)
    "fp8": Precision("fp8", "bfloat16", FP8_MIN_CC, ("dit_block", "text_block"), calibrated=True, text=True),
    # E2M1 weights and activations in 16-blocks with E4M3 block scales: Blackwell tensor cores (10.0)
    "nvfp4": Precision("nvfp4", "bfloat16", (10, 0), ("dit_block",), calibrated=True),
}
"""In order of preference: an engine holding layers of two low-bit kinds is recorded as the later one."""

# The oldest compute capability the kernel attention modes (`--attention`, fvrt.plugins.KERNEL_ATTENTION) run on
ATTENTION_MIN_CC: dict[str, tuple[tuple[int, int], str]] = {
    "fp8": (FP8_MIN_CC, "FP8 attention"),
    "fp8s": (FP8_MIN_CC, "smoothed FP8 attention"),
    "fa4": ((9, 0), "FlashAttention-4 attention"),
    "sage": ((9, 0), "SageAttention 8-bit attention"),
    "fa3fp8": ((9, 0), "FlashAttention-3 FP8 attention"),
    "fa3": ((9, 0), "FlashAttention-3 attention"),
}
QUANTIZED = tuple(n for n, p in PRECISIONS.items() if p.low_bit)
TEXT_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if p.text)


def min_compute_capability(precision: str, attention: str | None = None) -> tuple[tuple[int, int], str] | None:
    """(the oldest compute capability an engine of `precision` with `attention` runs on, what needs it), or None
    when any GPU does."""
    need = PRECISIONS[precision].min_cc if precision in PRECISIONS else None
    what = precision
    if attention in ATTENTION_MIN_CC:
        a_need, a_what = ATTENTION_MIN_CC[attention]
        if need is None or a_need > need:
            need, what = a_need, f"{precision} with {a_what}"
    return None if need is None else (need, what)


__all__ = [
    "ATTENTION_MIN_CC",
    "FP8_MIN_CC",
    "PRECISIONS",
    "QUANTIZED",
    "TEXT_PRECISIONS",
    "Precision",
    "min_compute_capability",
]
