"""GPU tests carry @pytest.mark.gpu and are skipped, with the reason, where no GPU can be used."""

import zlib

import numpy as np
import pytest

from cuflash import _jit


def pytest_collection_modifyitems(config, items):
    reason = _jit.gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name (reproducible, different per test)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def cp():
    return _jit.require_gpu()
