"""docs/config.md is what `edge-agent config-reference` generates from the parsers, and the
generator refuses to leave a key out or describe one that is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.service import configdoc, configref
from agent.service.config import example_config

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "config.md"

pytestmark = pytest.mark.timeout(60)


def test_docs_config_md_is_the_generated_reference():
    """Fails when a parser or a description changed and docs/config.md was not regenerated:
    run `.venv/bin/edge-agent config-reference > docs/config.md`."""
    assert DOC.read_text(encoding="utf-8") == configref.render()


def test_cli_prints_the_reference():
    out = subprocess.run(
        [sys.executable, "-m", "agent.service.cli", "config-reference"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == DOC.read_text(encoding="utf-8")


def test_every_key_of_the_example_and_every_uplink_key_is_documented():
    text = DOC.read_text(encoding="utf-8")
    for key in ("endpoints", "security", "credential", "deadline", "backoff_max"):
        assert f"| `{key}` |" in text.split("## `[uplink]`")[1].split("\n## ")[0]
    import tomllib

    raw = tomllib.loads(example_config().read_text(encoding="utf-8"))
    for table in ("agent", "uplink", "models", "detect"):
        for key in raw[table]:
            assert f"| `{key}` |" in text, f"{table}.{key}"


def test_a_key_without_description_is_refused(monkeypatch: pytest.MonkeyPatch):
    keys = dict(configdoc.KEYS)
    del keys["uplink.deadline"]
    monkeypatch.setattr(configdoc, "KEYS", keys)
    with pytest.raises(configref.ReferenceError, match=r"uplink\.deadline: no description"):
        configref.render()


def test_a_description_of_a_key_nobody_reads_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(configdoc, "KEYS", {**configdoc.KEYS, "uplink.colour": "Gone."})
    with pytest.raises(configref.ReferenceError, match=r"uplink\.colour: described .* no parser"):
        configref.render()


def test_a_conditional_key_the_sample_leaves_out_is_refused(monkeypatch: pytest.MonkeyPatch):
    """A key read only when present (``has()`` first) must be set by the sample, or its type and
    range would never be recorded."""
    real = configref.sample

    def without_threshold(work: Path) -> dict:
        raw = real(work)
        del raw["detect"]["threshold"]
        return raw

    monkeypatch.setattr(configref, "sample", without_threshold)
    with pytest.raises(configref.ReferenceError, match=r"detect\.threshold: read only when"):
        configref.render()
