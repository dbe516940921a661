"""PostgreSQL for tests: one private cluster per test session (tools/pgcluster.py, started only
when a test asks for it) and a fresh, empty database per test (``pg_dsn``). Registered in
tests/conftest.py, so a test in any directory may ask for ``pg_dsn`` or ``pg_cluster``.

Without PostgreSQL (no Debian package, no psycopg) the tests that need it are skipped, saying
why; ``./tools/dev setup`` installs both, so in CI they run. A cluster that is installed but does
not start fails them."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """The session's cluster (a ``pgcluster.Cluster``): ``dsn(database)`` and the superuser."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")
    from pgcluster import Cluster, ClusterUnavailable  # tools/ is on sys.path (conftest)

    try:
        cluster = Cluster()  # finds the binaries and the user to run them as
    except ClusterUnavailable as err:
        pytest.skip(f"no PostgreSQL: {err}")
    cluster.start()  # installed but failing to start is an error, not a skip
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: Any) -> Iterator[str]:
    """The DSN (``postgresql://`` URL, with a password) of a new empty database, dropped after
    the test (its sessions are ended)."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_cluster.dsn(name)
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
