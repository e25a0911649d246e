"""The energy report's header values (metering/accounting/report.py)."""

from __future__ import annotations

import pytest

from metering.accounting.report import header_number


def test_header_numbers_are_rounded_plain_decimals() -> None:
    """Headers carry four significant digits, never an exponent; the body keeps the float."""
    assert header_number(3.223328931619806) == "3.223"
    assert header_number(0.000028412) == "0.00002841"
    assert header_number(12345.6) == "12346"
    assert header_number(500.0) == "500"
    assert header_number(0.0) == "0"
    assert header_number(0.99995) == "1"
    for x in (3.223328931619806, 0.000028412, 12345.6, 7.0e-9, 41.5):
        assert "e" not in header_number(x)
        assert float(header_number(x)) == pytest.approx(x, rel=5e-4)
