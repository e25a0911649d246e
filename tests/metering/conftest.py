"""In tests/metering, `fake` is the in-process fake NVML library (tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import Fake


@pytest.fixture
def fake(fake_nvml: Fake) -> Fake:
    return fake_nvml
