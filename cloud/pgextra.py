"""What :class:`cloud.pgstorage.PostgresStorage` adds to the methods both storages share
(:class:`cloud.storesql.SharedStorage`): its transactions as :class:`cloud.storebase.Sql`, the
dashboard's reader (a pooled connection in a read-only transaction), loading records (their keys
in ``record_keys``, the day partitions they need, the ``record_arrival`` SEQUENCE moved past
what was loaded), the published models (table ``models``, file bytes in ``bytea``: a model
file is small), the published releases (:class:`cloud.releasestore.ReleaseBlobs`: in
blocks) and retention (:class:`cloud.pgretention.PostgresRetention`). Kept apart so that
cloud/pgstorage.py stays about ingest, state and notices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from psycopg import Connection

from cloud import pgschema
from cloud.pgretention import PostgresRetention
from cloud.releasestore import ReleaseBlobs
from cloud.storebase import ModelVersion, Sql, StorageUnavailable
from cloud.storesql import Row, SharedStorage

T = TypeVar("T")
Conn = Connection[Any]
DIALECT = "postgresql"


class PostgresExtras(PostgresRetention, ReleaseBlobs, SharedStorage):
    """Mixed into :class:`cloud.pgstorage.PostgresStorage`, whose ``_run``, ``_errors``,
    ``_pool`` and ``_days`` it uses."""

    _DIALECT = DIALECT
    _META = "meta"
    _pool: Any
    _days: set[str]
    where: str

    def _run(self, fn: Callable[[Conn], T], before: Callable[[Conn], None] | None = None) -> T:
        raise NotImplementedError

    def _errors(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _read(self, fn: Callable[[Sql], T]) -> T:
        return self._run(lambda conn: fn(Sql(conn, DIALECT)))

    _write = _read  # every _run is one transaction

    @contextmanager
    def reader(self) -> Iterator[Sql]:
        pool = self._pool
        if pool is None:
            raise StorageUnavailable(f"{self.where}: storage is closed")
        with self._errors(), pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            yield Sql(conn, DIALECT)

    def _loaded(self, db: Sql, table: str) -> None:
        if table == "verdicts":
            db.execute(
                "SELECT setval('verdict_order', greatest((SELECT last_value FROM verdict_order),"
                " (SELECT coalesce(max(n), 1) FROM window_verdicts)))"
            )

    def _load_records(self, rows: Sequence[Row]) -> int:
        days = {pgschema.partition_name(pgschema.day_of(r[5])): r[5] for r in rows}

        def before(conn: Conn) -> None:
            for name, when in days.items():
                if name not in self._days:
                    self._days.add(pgschema.ensure_partition(conn, when))

        def tx(conn: Conn) -> int:
            cols = list(zip(*rows, strict=True))
            keys = conn.execute(
                "INSERT INTO record_keys (device, seq, received)"
                " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::float8[])"
                " ON CONFLICT DO NOTHING RETURNING device, seq",
                (list(cols[0]), list(cols[1]), list(cols[5])),
            ).fetchall()
            inserted = {(d, int(s)) for d, s in keys}
            new = [r for r in rows if (r[0], r[1]) in inserted]
            if new:
                conn.execute(
                    "INSERT INTO records (device, seq, kind, created, time, received, arrival,"
                    " body) SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[],"
                    " %s::float8[], %s::float8[], %s::float8[], %s::bigint[], %s::bytea[])",
                    [list(c) for c in zip(*new, strict=True)],
                )
            conn.execute(
                "SELECT setval('record_arrival',"
                " greatest((SELECT last_value FROM record_arrival), %s))",
                (max(int(r[6]) for r in rows),),
            )
            return len(new)

        return self._run(tx, before)

    # -- published models ------------------------------------------------------------------------

    def put_model(
        self, name: str, version: str, manifest: bytes, data: bytes, published: float
    ) -> bool:
        def tx(conn: Conn) -> bool:
            cur = conn.execute(
                "INSERT INTO models (name, version, manifest, data, published)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (name, version, manifest, data, published),
            )
            return cur.rowcount == 1

        return self._run(tx)

    def models(self, name: str | None = None) -> list[ModelVersion]:
        sql = "SELECT name, version, manifest, published FROM models"
        args: tuple[Any, ...] = ()
        if name is not None:
            sql, args = sql + " WHERE name = %s", (name,)
        sql += " ORDER BY name, version"
        rows = self._run(lambda conn: conn.execute(sql, args).fetchall())
        return [ModelVersion(n, v, bytes(m), float(p)) for n, v, m, p in rows]

    def model(self, name: str, version: str) -> ModelVersion | None:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT manifest, published FROM models WHERE name = %s AND version = %s",
                (name, version),
            ).fetchone()
        )
        return None if row is None else ModelVersion(name, version, bytes(row[0]), float(row[1]))

    def model_file(self, name: str, version: str) -> bytes | None:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT data FROM models WHERE name = %s AND version = %s", (name, version)
            ).fetchone()
        )
        return None if row is None else bytes(row[0])
