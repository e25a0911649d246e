"""The commands' output width: a terminal's own, or tables whole without one."""

from __future__ import annotations

import io

from proxy.cli.output import PIPE_WIDTH, output_width


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_its_own_width() -> None:
    assert output_width(Terminal(), "80") is None


def test_without_a_terminal_tables_are_never_cut_to_a_narrow_width() -> None:
    assert output_width(io.StringIO(), None) == PIPE_WIDTH
    assert output_width(io.StringIO(), "80") == PIPE_WIDTH  # a CI's COLUMNS=80 cuts nothing
    assert output_width(io.StringIO(), "400") == 400
    assert output_width(io.StringIO(), "wide") == PIPE_WIDTH
