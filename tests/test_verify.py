"""builder/verify.py: the engine-vs-eager check behind `fvrt-build --verify` and the GPU scripts."""

from __future__ import annotations

import torch
from torch import nn

from fvrt.builder.engines import EngineSpec
from fvrt.builder.verify import INFO, check_against_fp32, check_engine, rel_err, worst


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return x * self.w


class Engine:
    """Stands in for a compiled engine: exact on valid rows, `garbage` on the others; layer-aware."""

    def __init__(self, spec: EngineSpec, garbage: float) -> None:
        self.spec, self.garbage = spec, garbage

    def run(self, key: str, x: torch.Tensor, keep: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor]:
        w = self.spec.per_layer[layer].w if layer is not None else self.spec.module.w
        y = x * w
        y[:, ~keep] = self.garbage
        return (y.detach(),)


def _spec(per_layer: bool) -> EngineSpec:
    gen = torch.Generator().manual_seed(0)
    layers = [Scale() for _ in range(3)]
    for i, m in enumerate(layers):
        m.w.data.fill_(1.0 + i)
    wrapper = type("Wrap", (nn.Module,), {"forward": lambda self, x, keep: self.block(x, keep)})()
    wrapper.block = layers[0]
    return EngineSpec(
        "toy",
        wrapper if per_layer else Scale(),
        ["x", "keep"],
        ["y"],
        ["any"],
        lambda _k: (torch.randn(1, 6, 4, generator=gen), torch.tensor([False, False, True, True, True, True])),
        per_layer=layers if per_layer else [],
        layers=[0, 1, 2] if per_layer else [],
        valid_rows=lambda inputs: inputs[1],
    )


def test_rows_without_meaning_are_reported_not_checked() -> None:
    spec = _spec(per_layer=False)
    errs = check_engine(spec, Engine(spec, garbage=7.0))
    assert errs["any y"] == 0.0 and worst(errs) == 0.0
    assert errs[f"{INFO}any y incl. rows without meaning"] > 0.1


def test_per_layer_engines_check_first_and_last_layer_with_their_weights() -> None:
    spec = _spec(per_layer=True)
    errs = check_engine(spec, Engine(spec, garbage=0.0))
    assert {k for k in errs if not k.startswith(INFO)} == {"any L0 y", "any L2 y"}
    assert worst(errs) == 0.0

    class Wrong(Engine):  # always applies layer 0's weights
        def run(self, key, x, keep, layer=None):  # type: ignore[no-untyped-def]
            return super().run(key, x, keep, 0)

    assert check_engine(spec, Wrong(spec, 0.0))["any L2 y"] > 0.5


def test_rel_err_integers_and_zero() -> None:
    assert rel_err(torch.tensor([1, 2]), torch.tensor([1, 2])) == 0.0
    assert rel_err(torch.tensor([1, 2]), torch.tensor([1, 3])) == 1.0
    assert rel_err(torch.ones(3), torch.ones(3)) == 0.0


def test_fp32_reference_separates_engine_error_from_bf16_rounding() -> None:
    """A bf16 module: an engine computing in fp32 is closer to the fp32 copy than eager bf16 is; an engine with a
    real error is not. The fp32 copy is a deep copy: the bf16 module stays bf16."""

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(1.3, dtype=torch.bfloat16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(4):  # eager rounds to bf16 after every op
                x = x * self.w + 0.1
            return x

    gen = torch.Generator().manual_seed(1)
    module = Chain()
    spec = EngineSpec("toy", module, ["x"], ["y"], ["any"], lambda _k: (torch.randn(4096, generator=gen).bfloat16(),))

    class Fp32Inside:
        def __init__(self, bias: float) -> None:
            self.bias = bias

        def run(self, key: str, x: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor]:
            y = x.float()
            for _ in range(4):
                y = y * module.w.float() + 0.1
            return ((y + self.bias).bfloat16(),)

    good = check_against_fp32(spec, Fp32Inside(0.0))["any y"]
    assert good["engine_vs_fp32"] < good["eager_bf16_vs_fp32"]
    bad = check_against_fp32(spec, Fp32Inside(0.5))["any y"]
    assert bad["engine_vs_fp32"] > 10 * bad["eager_bf16_vs_fp32"]
    assert module.w.dtype == torch.bfloat16
    # the reference placed explicitly (the build puts it on the CPU when the GPU is full): same numbers
    gen.manual_seed(1)
    good_again = check_against_fp32(spec, Fp32Inside(0.0))["any y"]
    gen.manual_seed(1)
    assert check_against_fp32(spec, Fp32Inside(0.0), on=torch.device("cpu"))["any y"] == good_again
