"""Fixtures of the udfs tests that reach an object store."""
from __future__ import annotations

import pytest

from tests.moto_s3 import moto_s3


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server (tests/moto_s3.py) with the bucket `vlm4rec-unit`, for one module."""
    with moto_s3() as client:
        yield client
