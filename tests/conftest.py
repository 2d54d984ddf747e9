import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

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
def tiny_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`make engines`' build (tiny random LTX-2.3, torch-aot, CPU) once per session, for the serving tests
    (compiled after tests/test_aoti.py's identical build, it finds Inductor's cache warm)."""
    from fvrt.builder.build import BuildRequest, build_engines

    root = tmp_path_factory.mktemp("tiny-engines")
    build_engines(BuildRequest(out_dir=root / "engines", random="tiny"), log=lambda _: None)
    yield root / "engines"
    shutil.rmtree(root, ignore_errors=True)
