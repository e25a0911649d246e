"""Request ids: unguessable, unique across pool refills, the documented shape."""

from __future__ import annotations

import re

from proxy.relay.exchange import RequestIds


def test_ids_are_unique_across_refills_and_shaped_as_documented() -> None:
    ids = RequestIds(batch=4)
    made = [ids.new() for _ in range(1_000)]  # 250 refills of the pool
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"req-[0-9a-f]{24}", i) for i in made)
    # Two generators share nothing: no module-level state.
    assert not set(made) & {RequestIds().new() for _ in range(100)}
