import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tiny_models


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models; shared transformers code objects would otherwise pile up
    cache entries across tests and hit Dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
