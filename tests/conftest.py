import pytest

import pgest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# The suite checks CUDA launches synchronously, so that an op's error is
# raised by the op (pgest.sync_errors); the deferred mode has its own tests
# (test_device_errors.py, test_cuda.py), which switch it back on.
pgest.set_sync_errors(True)
