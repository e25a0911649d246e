"""The demo's prompt loop against the proxy and the fake backend on real sockets: a prompt
whose stream the backend breaks off is one row marked cut, with the energy the proxy sent
before the error event, not the end of the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from proxy.cli.demo import DEMO_PROMPTS, _print_table, _send_prompts
from tests.conftest import serve_proxy
from tests.support.fakes.openai_backend import FakeState


def test_a_broken_stream_is_one_cut_row_with_its_energy(
    fake_server: str, fake: tuple[Any, FakeState], tmp_path: Path
) -> None:
    _, state = fake
    state.die_after = 1  # every stream breaks after its first token; JSON answers are fine
    console = Console(record=True, width=200)
    with serve_proxy(tmp_path, fake_server) as proxy:
        rows = _send_prompts(console, proxy, "fake-model", 4, lambda: "")
        _print_table(console, rows, proxy)
    assert [r.category for r in rows] == [c for c, _, _ in DEMO_PROMPTS]
    for row, (_, _, stream) in zip(rows, DEMO_PROMPTS, strict=True):
        assert row.energy["joules"] > 0
        if stream:
            assert row.error.startswith("broken off:")
        else:
            assert not row.error
    out = console.export_text()
    assert "failed:" not in out
    assert out.count("(cut)") == 2 * sum(1 for _, _, s in DEMO_PROMPTS if s)
