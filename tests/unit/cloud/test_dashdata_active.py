"""The dashboard's "alert active" from a device's newest alert: a raise starts an episode, a
clear ends it, and a changepoint (kind ``change``) repeats the verdict of the episode it falls in,
``normal`` outside one (agent/detect/detector.py)."""

from __future__ import annotations

from cloud.dashdata import _active


def alert(kind: str, verdict: str = "novel_anomaly") -> dict[str, object]:
    return {"kind": kind, "verdict": verdict}


def test_an_episode_is_on_after_a_raise_or_a_change_inside_one() -> None:
    assert _active(alert("raise"))
    assert not _active(alert("clear"))
    assert _active(alert("change", "known_failure"))  # inside an episode
    assert not _active(alert("change", "normal"))  # the process changed, no episode
    assert not _active(None)
