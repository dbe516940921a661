"""Where renumbered alert records went (agent/store/renumber.py, ``moved:`` rows of meta): kept
in the renumbering's transaction, followed across several renumberings and a reopen, bounded to
the newest MAX_MOVES, and only for alerts (what a validation names)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.store import renumber as renumber_mod
from agent.store.queue import NewRecord, Store
from agent.store.settings import StoreSettings
from agent.wire.records import Kind


async def test_moves_of_alerts_are_followed_kept_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(renumber_mod, "MAX_MOVES", 3)
    settings = StoreSettings(path=tmp_path / "queue.db")
    st = await Store.open(settings)
    alerts = await st.put([NewRecord(Kind.ALERT, b"\xa0") for _ in range(4)])
    [event] = await st.put([NewRecord(Kind.EVENT, b"\xa0")])
    first = await st.renumber([alerts[0], event], floor=0)
    assert await st.moved([alerts[0], event]) == {alerts[0]: first[alerts[0]]}  # alerts only
    again = await st.renumber([first[alerts[0]]], floor=0)
    assert await st.moved([alerts[0]]) == {alerts[0]: again[first[alerts[0]]]}  # followed
    later = await st.renumber(alerts[1:], floor=0)
    assert st.renumberings == 3
    await st.close()

    st = await Store.open(settings)  # durable: a process after the renumberings finds them
    moved = await st.moved([*alerts, event, 12])
    await st.close()
    # the oldest moves (of alerts[0], twice) are forgotten; the newest three stay
    assert moved == {a: later[a] for a in alerts[1:]}
    conn = sqlite3.connect(settings.path)
    rows = conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'moved:%'").fetchone()[0]
    conn.close()
    assert rows == 3
