import pytest
import torch

from fvrt.builder.checkpoint import ModelVersion

collect_ignore = ["oracle.py", "helpers.py"]


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
