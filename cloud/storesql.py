"""Storage methods written once for both databases, over :class:`cloud.storebase.Sql`: the
validation verdicts, the dashboard's reader, and the bulk copy of ``edge-agent-cloud migrate``
(dump, load, counts, the migration mark). :class:`cloud.storage.SQLiteStorage` and
:class:`cloud.pgstorage.PostgresStorage` inherit :class:`SharedStorage` and supply how one read
and one write transaction run (``_read``, ``_write``) and what they do differently:

- the table of named numbers (storage id, arrival counter, migration mark): ``counters`` in
  SQLite, ``meta`` in PostgreSQL (``_META``);
- loading records (``_load_records``): SQLite writes one table and its arrival counter;
  PostgreSQL writes ``record_keys`` too, makes the day partitions and moves its SEQUENCE;
- PostgreSQL numbers verdicts with a SEQUENCE, which a load moves past what it loaded
  (``_loaded``);
- published models: files in SQLite's directory (cloud/modelfiles.py), a table in PostgreSQL;
  their bulk copy here goes through the model methods of the Protocol, so it is one code path.

Keyset pagination: a dump reads the rows after a key in key order, so memory stays bounded by a
chunk. Text keys compare byte-wise in both (SQLite's BINARY collation, PostgreSQL's
``COLLATE "C"``), so both give one order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from agent.errors import AgentError
from agent.wire import statedoc
from agent.wire.batch import WireRecord
from agent.wire.credentials import Credential
from agent.wire.statedoc import Entry
from cloud import featurestore, linkhistory
from cloud.commandstore import CommandTables
from cloud.featurestore import StoredFeatures
from cloud.learnstore import LearnTables
from cloud.relaystore import RelayTables
from cloud.releasestore import ReleaseTables
from cloud.storebase import (
    TABLES,
    Batch,
    CredentialChanged,
    DuplicateKeyId,
    IngestResult,
    MigrationRefused,
    ModelVersion,
    Sql,
    Table,
    Verdict,
)

log = logging.getLogger("cloud.storage")

T = TypeVar("T")
Row = tuple[Any, ...]

#: The most parameters one :meth:`SharedStorage.reported_keys` statement takes (SQLite's limit
#: is 32,766 since 3.32, 999 before).
REPORTED_KEYS_CHUNK = 900
#: Logical table -> the table that holds it (where the names differ).
PHYSICAL = {"verdicts": "window_verdicts", "sequences": "oscore_sequence"}
MIGRATING = "migrating_from"  # the name of the migration mark among the named numbers
STORAGE_ID = "storage_id"
#: The stored credential document's generation, in each dialect (``doc`` is TEXT on both).
GENERATION_SQL = {
    "sqlite": "json_extract(credentials.doc, '$.generation')",
    "postgresql": "(credentials.doc::jsonb ->> 'generation')::bigint",
}


def table(name: str) -> Table:
    found = TABLES.get(name)
    if found is None:
        raise ValueError(f"no table {name!r} (one of {', '.join(TABLES)})")
    return found


def _select(spec: Table, dialect: str) -> str:
    """The column list of a dump (link_history's value: the dialect's columns)."""
    if spec.name != "link_history":
        return ", ".join(spec.columns)
    return ", ".join([*spec.columns[:-1], *linkhistory.value_columns(dialect)])


def _row(spec: Table, row: Sequence[Any]) -> Row:
    """A stored row as :meth:`Storage.dump` gives it (bytes, one link value)."""
    if spec.name == "link_history":
        return (*row[:4], linkhistory.unpack(row[4:]))
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


def _key_sql(spec: Table) -> tuple[str, str]:
    """``(k1, k2)`` and ``(?, ?)`` for a row-value comparison of the key."""
    return f"({', '.join(spec.key)})", f"({', '.join('?' * len(spec.key))})"


def key_of(spec: Table, row: Row) -> Row:
    return tuple(row[spec.columns.index(k)] for k in spec.key)


def id_number(storage_id: str) -> int:
    """The number a storage id (16 hex digits) stands for."""
    number = int(storage_id, 16)
    if not 0 <= number < 2**63:
        raise ValueError(f"{storage_id!r} is not a storage id")
    return number


class SharedStorage(LearnTables, RelayTables, CommandTables, ReleaseTables):
    """The methods of :class:`cloud.storebase.Storage` that are the same on both databases."""

    _DIALECT = ""
    _META = ""
    _store: str | None

    def _read(self, fn: Callable[[Sql], T]) -> T:
        raise NotImplementedError

    def _write(self, fn: Callable[[Sql], T]) -> T:
        raise NotImplementedError

    def _load_records(self, rows: Sequence[Row]) -> int:
        raise NotImplementedError

    def _loaded(self, db: Sql, table: str) -> None:
        """After a load of ``table``, in its transaction: move what numbers that table."""

    def put_credential(
        self,
        credential: Credential,
        now: float,
        *,
        replaces: int | None = None,
        unrevoke: bool = True,
    ) -> None:
        """:meth:`cloud.storebase.Storage.put_credential`: the key-id check, and the upsert whose
        ``DO UPDATE`` condition is ``replaces``/``unrevoke``, in one transaction."""
        doc = json.dumps(credential.to_json(), sort_keys=True)

        def tx(db: Sql) -> None:
            row = db.execute(
                "SELECT principal FROM credentials WHERE kid = ?", (credential.sender_id,)
            ).fetchone()
            if row is not None and row[0] != credential.principal:
                raise DuplicateKeyId(f"key id {credential.sender_id.hex()} is taken")
            guard, params = "TRUE", ()
            if replaces is not None:
                guard, params = f"{GENERATION_SQL[db.dialect]} = ?", (replaces,)
                if not unrevoke:
                    guard += " AND credentials.revoked IS NULL"
            cur = db.execute(
                "INSERT INTO credentials (principal, role, kid, doc, created)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (principal) DO UPDATE SET"
                " role = excluded.role, kid = excluded.kid, doc = excluded.doc,"
                f" created = excluded.created, revoked = NULL WHERE {guard}",
                (credential.principal, credential.role, credential.sender_id, doc, now, *params),
            )
            if cur.rowcount != 1:
                raise CredentialChanged(
                    f"{credential.principal}: the stored credential is no longer generation "
                    f"{replaces} and valid (rekeyed, rotated or revoked meanwhile); nothing "
                    "written, read it again"
                )
            self._principals_changed(db, credential.principal)

        self._write(tx)

    def ingest(
        self, device: str, records: Sequence[WireRecord], now: float, register: bool = False
    ) -> IngestResult:
        """:meth:`ingest_many` of one batch; its error raised."""
        result = self.ingest_many([(device, records, register)], now)[0]
        if isinstance(result, AgentError):
            raise result
        return result

    def ingest_many(self, batches: Sequence[Batch], now: float) -> list[IngestResult | AgentError]:
        raise NotImplementedError  # each backend's

    def reader(self) -> AbstractContextManager[Sql]:
        raise NotImplementedError

    def put_model(
        self, name: str, version: str, manifest: bytes, data: bytes, published: float
    ) -> bool:
        raise NotImplementedError

    def models(self, name: str | None = None) -> list[ModelVersion]:
        raise NotImplementedError

    def model_file(self, name: str, version: str) -> bytes | None:
        raise NotImplementedError

    # -- reported state ---------------------------------------------------------------------------

    def reported_keys(
        self, devices: Sequence[str], keys: Sequence[str]
    ) -> dict[str, dict[str, Entry]]:
        """The entries of ``keys`` that each of ``devices`` reported, by device (a device that
        reported none of them is absent): indexed look-ups by (device, key), however much else
        the devices report, in one read. Values decode as :meth:`reported`'s do (a stored value
        this endpoint cannot read is a :class:`agent.wire.statedoc.RawValue`)."""
        wanted, names = sorted(set(devices)), sorted(set(keys))
        if not wanted or not names:
            return {}
        step = max(1, REPORTED_KEYS_CHUNK // len(names))

        def read(db: Sql) -> list[Row]:
            rows: list[Row] = []
            for at in range(0, len(wanted), step):
                part = wanted[at : at + step]
                rows += db.execute(
                    "SELECT device, key, version, value FROM reported"
                    f" WHERE device IN ({', '.join('?' * len(part))})"
                    f" AND key IN ({', '.join('?' * len(names))})",
                    (*part, *names),
                ).fetchall()
            return rows

        out: dict[str, dict[str, Entry]] = {}
        for device, key, version, value in self._read(read):
            entry = Entry(int(version), statedoc.decode_value(bytes(value)))
            out.setdefault(device, {})[key] = entry
        return out

    # -- features records (cloud/featurestore.py) ------------------------------------------------

    def features(
        self, device: str, since: float | None = None, limit: int | None = None
    ) -> list[StoredFeatures]:
        """The device's features records in seq order (``since``: last reading at or after)."""
        return self._read(lambda db: featurestore.read(db, device, since, limit))

    # -- verdicts --------------------------------------------------------------------------------

    def verdict(self, device: str, seq: int, digest: str | None = None) -> bytes | None:
        sql = "SELECT body FROM window_verdicts WHERE device = ? AND seq = ?"
        args: tuple[Any, ...] = (device, seq)
        if digest is not None:
            sql, args = sql + " AND digest = ?", (*args, digest)
        row = self._read(lambda db: db.execute(sql + " ORDER BY n LIMIT 1", args).fetchone())
        return None if row is None else bytes(row[0])

    def put_verdicts(self, items: Sequence[Verdict], now: float | None = None) -> list[bytes]:
        received = time.time() if now is None else now

        def tx(db: Sql) -> list[bytes]:
            out = []
            for device, seq, digest, body in items:
                db.execute(
                    "INSERT INTO window_verdicts (device, seq, digest, body, received)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (device, seq, digest, body, received),
                )
                row = db.execute(
                    "SELECT body FROM window_verdicts WHERE device = ? AND seq = ? AND digest = ?",
                    (device, seq, digest),
                ).fetchone()
                out.append(bytes(row[0]))
            return out

        return self._write(tx) if items else []

    # -- bulk copy -------------------------------------------------------------------------------

    def table_count(self, name: str) -> int:
        table(name)  # a known table, or ValueError
        if name == "models":
            return len(self.models())
        phys = PHYSICAL.get(name, name)
        return int(self._read(lambda db: db.execute(f"SELECT count(*) FROM {phys}").fetchone())[0])

    def dump(self, name: str, after: Row | None, limit: int) -> list[Row]:
        spec = table(name)
        if name == "models":
            return list(self._dump_models(after, limit))
        cols, marks = _key_sql(spec)
        where = f" WHERE {cols} > {marks}" if after is not None else ""

        def read(db: Sql) -> list[Row]:
            sql = (
                f"SELECT {_select(spec, db.dialect)} FROM {PHYSICAL.get(name, name)}{where}"
                f" ORDER BY {', '.join(spec.key)} LIMIT ?"
            )
            rows = db.execute(sql, (*(after or ()), limit)).fetchall()
            return [_row(spec, row) for row in rows]

        return self._read(read)

    def _dump_models(self, after: Row | None, limit: int) -> Iterator[Row]:
        for m in self.models():
            if after is not None and (m.name, m.version) <= tuple(after):
                continue
            if limit <= 0:
                return
            data = self.model_file(m.name, m.version)
            if data is None:  # a version whose file went away: nothing to copy
                log.warning("event=model_file_missing name=%s version=%s", m.name, m.version)
                continue
            limit -= 1
            yield (m.name, m.version, m.manifest, data, m.published)

    def load(self, name: str, rows: Sequence[Row]) -> int:
        spec = table(name)
        if not rows:
            return 0
        if name == "models":
            return sum(self.put_model(*row) for row in rows)
        if name == "records":
            return self._load_records(rows)
        if name == "sequences":
            return self._write(lambda db: self._load_sequences(db, rows))

        def tx(db: Sql) -> int:
            if spec.mutable:
                _upsert(db, spec, rows)
                return len(rows)
            new = missing(db, spec, rows)
            if name == "link_history":
                new = [(*r[:4], *linkhistory.pack(db.dialect, r[4])) for r in new]
            insert(db, PHYSICAL.get(name, name), _select(spec, db.dialect), new)
            self._loaded(db, name)
            return len(new)

        return self._write(tx)

    def _load_sequences(self, db: Sql, rows: Sequence[Row]) -> int:
        """The OSCORE counters: the larger of the two stays (never a number handed out twice)."""
        larger = "max" if db.dialect == "sqlite" else "greatest"
        new = len(missing(db, table("sequences"), rows))
        db.executemany(
            "INSERT INTO oscore_sequence (principal, reserved) VALUES (?, ?)"
            " ON CONFLICT (principal) DO UPDATE"
            f" SET reserved = {larger}(oscore_sequence.reserved, excluded.reserved)",
            rows,
        )
        return new

    # -- the migration mark ----------------------------------------------------------------------

    def migration(self) -> str | None:
        sql = f"SELECT value FROM {self._META} WHERE name = ?"
        row = self._read(lambda db: db.execute(sql, (MIGRATING,)).fetchone())
        return None if row is None else f"{int(row[0]):016x}"

    def set_migration(self, source_id: str, done: bool = False) -> None:
        """Mark this storage as being filled from ``source_id`` (module docstring of
        cloud/migrate.py), in ONE transaction with the check that allows it: no mark yet and no
        data (:data:`TABLES` but the OSCORE counters; PostgreSQL's models and releases too,
        SQLite keeps those as files, which the caller checks); else :class:`MigrationRefused`
        and nothing changes. The mark is inserted only if absent, so of two migrates that check
        at once one marks and the other is refused. ``done``: this storage takes
        ``source_id`` as its own id and the mark goes."""
        number = id_number(source_id)

        def tx(db: Sql) -> None:
            if done:
                db.execute(
                    f"INSERT INTO {self._META} (name, value) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (STORAGE_ID, number),
                )
                db.execute(f"DELETE FROM {self._META} WHERE name = ?", (MIGRATING,))
                return
            mark = db.execute(
                f"SELECT value FROM {self._META} WHERE name = ?", (MIGRATING,)
            ).fetchone()
            if mark is not None:
                raise MigrationRefused(
                    f"a migrate from storage {int(mark[0]):016x} marked the target already"
                )
            held = [name for name in _held_tables(db.dialect) if _any_row(db, name)]
            if held:
                raise MigrationRefused(f"the target holds data already ({', '.join(held)})")
            cur = db.execute(
                f"INSERT INTO {self._META} (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (MIGRATING, number),
            )
            if cur.rowcount != 1:  # PostgreSQL: another migrate's mark committed meanwhile
                raise MigrationRefused("another migrate marked the target at the same time")

        self._write(tx)
        if done:
            self._store = None  # read again: the id taken over


def _held_tables(dialect: str) -> list[str]:
    """The tables (physical names) a migrate's target must not hold rows of."""
    names = [PHYSICAL.get(n, n) for n in TABLES if n not in ("sequences", "models")]
    return names + (["models", "releases"] if dialect == "postgresql" else [])


def _any_row(db: Sql, name: str) -> bool:
    return bool(db.execute(f"SELECT EXISTS (SELECT 1 FROM {name})").fetchone()[0])


def missing(db: Sql, spec: Table, rows: Sequence[Row]) -> list[Row]:
    """The rows (in key order, as a dump gives them) whose keys are not stored yet: one range
    query over the chunk's keys (a table without a unique constraint, link_history, too)."""
    cols, marks = _key_sql(spec)
    keys = [key_of(spec, row) for row in rows]
    first, last = min(keys), max(keys)
    stored = {
        tuple(r)
        for r in db.execute(
            f"SELECT {', '.join(spec.key)} FROM {PHYSICAL.get(spec.name, spec.name)}"
            f" WHERE {cols} >= {marks} AND {cols} <= {marks}",
            (*first, *last),
        )
    }
    return [row for row, key in zip(rows, keys, strict=True) if key not in stored]


def _upsert(db: Sql, spec: Table, rows: Sequence[Row]) -> None:
    """A mutable table's rows: new ones inserted, stored ones replaced."""
    sets = ", ".join(f"{c} = excluded.{c}" for c in spec.columns if c not in spec.key)
    db.executemany(
        f"INSERT INTO {spec.name} ({', '.join(spec.columns)})"
        f" VALUES ({', '.join('?' * len(spec.columns))})"
        f" ON CONFLICT ({', '.join(spec.key)}) DO UPDATE SET {sets}",
        rows,
    )


def insert(db: Sql, name: str, columns: str, rows: Sequence[Row]) -> None:
    """INSERT ``rows`` into ``name`` (``columns``: "a, b, c"), a row whose key is there already
    left out (``ON CONFLICT DO NOTHING``)."""
    if rows:
        marks = ", ".join("?" * len(columns.split(", ")))
        db.executemany(
            f"INSERT INTO {name} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows
        )
