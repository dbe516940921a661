"""Shared fixtures. Tests use the real thing at every boundary: real files, real sockets on
loopback, real driver code on simulated buses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from drivers.clock import VirtualClock
from tests.pg import pg_cluster, pg_dsn  # noqa: F401  (PostgreSQL fixtures for every test)

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
if str(TOOLS) not in sys.path:  # tools/linkem.py and the bench modules are imported by tests
    sys.path.insert(0, str(TOOLS))


def skab_path() -> Path:
    """The SKAB data: $EDGE_AGENT_SKAB, or ../shared/data/skab beside the checkout."""
    env = os.environ.get("EDGE_AGENT_SKAB")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "skab"


@pytest.fixture
def skab_dir() -> Path:
    path = skab_path()
    if not (path / "valve1" / "0.csv").is_file():
        pytest.skip(f"SKAB data not found at {path} (set EDGE_AGENT_SKAB to its folder)")
    return path


@pytest.fixture
def vclock() -> VirtualClock:
    return VirtualClock()
