import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import TinyBuild, folder_state

from fvrt.builder.checkpoint import ModelVersion

collect_ignore = ["oracle.py", "helpers.py"]


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has made `_tmp_path_factory`
def pytest_configure(config: pytest.Config) -> None:
    """Inductor's compile cache goes under this session's base folder, which pytest removes when every test
    passed: a CI machine's disk does not fill with gigabytes of cached kernels."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ and hasattr(config, "_tmp_path_factory"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(config._tmp_path_factory.getbasetemp() / "inductor-cache")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """`module_tmp(name)` makes a folder for a module's fixtures; all are removed when the module ends."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[ModelVersion.LTX2, ModelVersion.LTX23], ids=["ltx2", "ltx23"])
def version(request: pytest.FixtureRequest) -> ModelVersion:
    return request.param


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyBuild]:
    """`make engines`' build (tiny random LTX-2.3, torch-aot, CPU), once per session for the tests that only read
    it: tests/test_aoti.py's LTX-2.3 engines and the serving tests (a CPU build takes minutes). A test that builds
    into engines copies them first; the folder is checked unchanged at the end of the session."""
    from fvrt.builder.build import BuildRequest, build_engines

    root = tmp_path_factory.mktemp("tiny-engines")
    t0 = time.perf_counter()
    result = build_engines(
        BuildRequest(out_dir=root / "engines", random="tiny", version=ModelVersion.LTX23.value), log=lambda _: None
    )
    build = TinyBuild(root / "engines", result, time.perf_counter() - t0)
    built_state = folder_state(build.path)
    yield build
    changed = sorted(set(built_state.items()) ^ set(folder_state(build.path).items()))
    shutil.rmtree(root, ignore_errors=True)
    if changed:
        pytest.fail(f"a test wrote into the shared tiny engines (copy them first): {sorted({p for p, _ in changed})}")


@pytest.fixture(scope="session")
def tiny_engines(tiny_build: TinyBuild) -> Path:
    """The session's tiny LTX-2.3 engine directory (`tiny_build`); read it, never write into it."""
    return tiny_build.path


@pytest.fixture(scope="session")
def tiny_cuda_cudnn_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 CUDA build with --attention cudnn, once per session for the GPU tests that compare an attention
    kernel's engines with it (they copy it and rebuild only the DiT engines); read it, never write into it."""
    from fvrt.builder.build import BuildRequest, build_engines

    out = tmp_path_factory.mktemp("tiny-cuda-cudnn") / "engines"
    build_engines(
        BuildRequest(out_dir=out, random="tiny", precision="bf16", device="cuda", attention="cudnn"), log=lambda _: None
    )
    return out
