import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous_env():
    """A test that trains in-process starts a one-rank process group, which sets RANK /
    MASTER_PORT ... in os.environ (gld.train.engine.setup_distributed) while this process keeps
    the port. Restore them after every test, so that later tests' subprocesses (launch/train.py,
    multi-rank workers) do not inherit a rendezvous they cannot bind."""
    import os

    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
