"""PostgreSQL for tests: one private cluster per test session (tools/pgcluster.py, started only
when a test asks for it) and a fresh, empty database per test (``pg_dsn``). Registered in
tests/conftest.py, so a test in any directory may ask for ``pg_dsn`` or ``pg_cluster``.

``./tools/dev setup`` installs PostgreSQL (Debian's package, as root) and psycopg (the dev
extra); without them the tests that need it fail, saying so: they never skip."""

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
    from pgcluster import Cluster, ClusterUnavailable  # tools/ is on sys.path (conftest)

    try:
        cluster = Cluster()  # finds the binaries and the user to run them as
    except ClusterUnavailable as err:  # ./tools/dev setup installs it: a test that needs it fails
        pytest.fail(f"no PostgreSQL: {err} (./tools/dev setup installs it, as root)")
    cluster.start()
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
