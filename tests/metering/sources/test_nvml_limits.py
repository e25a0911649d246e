"""GPU power limits through the real nvidia-ml-py binding over the fake library
(metering/sources/nvml_limits.py): get, set, restore, and NVML's refusals."""

from __future__ import annotations

import pynvml
import pytest

from metering.sources.nvml_limits import (
    default_power_limit_w,
    get_power_limit_w,
    power_limit_constraints_w,
    set_power_limit_w,
)
from tests.conftest import Fake
from tests.metering.sources.test_nvml import open_one
from tests.support.fakenvml import NVML_ERROR_GPU_IS_LOST


def test_power_limits_get_set_and_restore(fake: Fake) -> None:
    source = open_one(
        fake,
        "device 0 limit_mw=250000 min_limit_mw=100000 max_limit_mw=350000 "
        "default_limit_mw=300000\n",
    )
    try:
        assert power_limit_constraints_w(source) == (100.0, 350.0)
        assert get_power_limit_w(source) == 250.0
        assert default_power_limit_w(source) == 300.0
        set_power_limit_w(source, 200.5)
        assert get_power_limit_w(source) == 200.5
        set_power_limit_w(source, default_power_limit_w(source))
        assert get_power_limit_w(source) == 300.0
        assert fake.log_lines() == ["set 0 200500", "set 0 300000"]
        with pytest.raises(ValueError, match=r"400 W is outside .*100 W to 350 W"):
            set_power_limit_w(source, 400.0)
        with pytest.raises(ValueError, match="finite"):
            set_power_limit_w(source, float("nan"))
        assert len(fake.log_lines()) == 2
        # The fake checks the range itself too, as NVML does.
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceSetPowerManagementLimit(handle, 99_999)
    finally:
        source.close()
    with pytest.raises(ValueError, match="closed"):
        get_power_limit_w(source)


def test_setting_a_power_limit_without_permission_says_needs_root(fake: Fake) -> None:
    source = open_one(fake, "device 0 set_limit=0\n")
    try:
        with pytest.raises(PermissionError, match="needs root"):
            set_power_limit_w(source, 200.0)
        assert get_power_limit_w(source) == 300.0
        assert fake.log_lines() == []
    finally:
        source.close()


def test_power_limit_on_a_lost_gpu_is_an_nvml_error(fake: Fake) -> None:
    source = open_one(fake, "device 0\n")
    try:
        fake.write("device 0 lost=1\n")
        with pytest.raises(RuntimeError, match="GPU is lost") as excinfo:
            get_power_limit_w(source)
        assert getattr(excinfo.value, "code", None) == NVML_ERROR_GPU_IS_LOST
    finally:
        source.close()
