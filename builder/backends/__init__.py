"""Engine backends: one stage contract (`fvrt.builder.stages.base.EngineSpec`), several compilers, one protocol
(`fvrt.builder.backends.base.Backend`).

`BACKENDS` registers each backend once: the module defining it (imported only when it is used, so a machine
without a backend's library can build with the others) and the request options it takes. `configure(name,
options)` refuses an option the backend does not take (one-line `OptionError`), imports its module and returns the
configured backend object; the build loop talks to that object only.
"""

from __future__ import annotations

import importlib

from fvrt.builder.backends.base import Backend, BackendInfo, BackendOptions, refuse_options

_TRT_JOBS = "it builds one plan at a time in this process"
BACKENDS: dict[str, BackendInfo] = {
    "torch-aot": BackendInfo("fvrt.builder.backends.aoti", frozenset({"cxx", "conv_layout", "jobs"}), verifies=True),
    "tensorrt": BackendInfo(
        "fvrt.builder.backends.tensorrt",
        refusals={"target_ccs": "full TensorRT builds for the GPU it runs on", "jobs": _TRT_JOBS},
    ),
    "tensorrt-rtx": BackendInfo("fvrt.builder.backends.tensorrt", frozenset({"target_ccs"}), {"jobs": _TRT_JOBS}),
}


def configure(name: str, options: BackendOptions) -> Backend:
    """The backend object for `name` with `options`: ValueError (one line) for an unknown name, OptionError for an
    option it does not take or a value it refuses, ImportError when its builder module cannot be imported."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    info = BACKENDS[name]
    refuse_options(name, info, options, BACKENDS)
    return importlib.import_module(info.module).configure(name, options)


def get_backend(name: str) -> Backend:
    """The backend object for `name` with default options."""
    return configure(name, BackendOptions())


__all__ = ["BACKENDS", "configure", "get_backend"]
