"""The chaos harness's short run, in CI: the real endpoint and the real agent (each its own
process, the agent's link through a proxy with 10 % loss) while the agent is SIGKILLed twice, the
endpoint once, the agent's data directory loses power once, its queue is corrupted at rest once,
a second agent's small disk fills and empties, 1,000 malformed datagrams hit the endpoint and 50
hostile desired documents reach the agent (tools/chaos, plan ``SHORT``).

Attacks named: process kills at random moments, power loss of un-synced writes, a queue file
corrupted at rest (b-tree leaf pages overwritten), a disk that fills, malformed CoAP datagrams,
hostile desired-state documents. Afterwards nothing committed is lost, nothing is stored twice,
every readable row of the damaged queue is salvaged and delivered, no process crashed, no log
holds a traceback, and the endpoint's log grew by at most 20 bytes per bad datagram.

Needs root: FUSE for the power-cut file system, ``mount -t tmpfs`` for the small disk. The long
run is ``./tools/dev bench chaos``; ``./tools/dev chaos`` runs any plan on demand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.chaos import SHORT, run_chaos


@pytest.mark.timeout(180)
def test_nothing_lost_or_stuck_through_kills_power_cuts_corruption_full_disk_and_hostile_input(
    tmp_path: Path,
) -> None:
    report = run_chaos(SHORT, tmp_path)
    text = report.render()
    assert not report.errors, text
    assert report.agent_sigkills == SHORT.agent_kills, text
    assert report.endpoint_sigkills == SHORT.endpoint_kills, text
    assert report.power_cuts == SHORT.power_cuts, text
    assert len(report.damages) == SHORT.corruptions, text
    assert report.disk.fills == SHORT.disk_fills, text
    assert report.flood.sent == SHORT.datagrams, text
    assert report.documents.written == SHORT.documents, text

    summary = report.summary()
    assert summary["lost"] == 0, text
    assert summary["duplicated"] == 0, text
    assert summary["crashes"] == 0, text
    assert summary["tracebacks"] == 0, text
    assert summary["salvaged_ratio"] == 1.0, text
    assert summary["log_bytes_per_bad_datagram"] <= 20, text
    assert not report.documents.hostile_applied, text
    assert report.drain_seconds is not None, text
