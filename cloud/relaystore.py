"""Which gateway each device is behind (docs/security.md "Gateways"), written once for both
databases: the table ``relays``, one row per attached device (``device`` PRIMARY KEY: a device is
behind one gateway at most), with the gateway's principal name and when it was attached.

:class:`RelayTables` is a mixin of :class:`cloud.storesql.SharedStorage` (it uses ``_read`` and
``_write``); SQLite creates the table with :data:`SQLITE_SCHEMA` at open, PostgreSQL with its
migration :data:`PG_MIGRATION` (cloud/pgschema.py). An attachment decides what a gateway may do,
so a change is announced like a credential's (:meth:`RelayTables._principals_changed`:
PostgreSQL's notice; SQLite's endpoints notice any commit), and a running endpoint reloads its
map of them with its principals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from cloud.storebase import Sql, SqlTables, UnknownDevice

T = TypeVar("T")

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS relays (
    device TEXT PRIMARY KEY,
    gateway TEXT NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS relays_by_gateway ON relays (gateway);
"""

PG_MIGRATION = (
    """CREATE TABLE relays (
        device TEXT COLLATE "C" PRIMARY KEY,
        gateway TEXT COLLATE "C" NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX relays_by_gateway ON relays (gateway)",
)


class RelayTables(SqlTables):
    """Storage methods of the ``relays`` table (both dialects)."""

    def _principals_changed(self, db: Sql, principal: str) -> None:
        """Tell other endpoint processes that what ``principal`` may do changed, in the
        transaction ``db`` (PostgreSQL notifies; SQLite's readers see any commit)."""

    def attach(self, gateway: str, devices: Sequence[str], now: float) -> dict[str, str | None]:
        """Put each of ``devices`` behind ``gateway`` (moved from another gateway, if it was
        behind one), in one transaction. Returns, per device, the gateway it was behind before
        (None: none). :class:`UnknownDevice` (and nothing changed) for a device that is not
        registered."""

        def tx(db: Sql) -> dict[str, str | None]:
            before: dict[str, str | None] = {}
            for device in devices:
                if db.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is None:
                    raise UnknownDevice.of(device)
                row = db.execute("SELECT gateway FROM relays WHERE device = ?", (device,))
                found = row.fetchone()
                before[device] = None if found is None else found[0]
                db.execute(
                    "INSERT INTO relays (device, gateway, updated) VALUES (?, ?, ?)"
                    " ON CONFLICT (device) DO UPDATE"
                    " SET gateway = excluded.gateway, updated = excluded.updated",
                    (device, gateway, now),
                )
            for old in {g for g in before.values() if g is not None} | {gateway}:
                self._principals_changed(db, old)
            return before

        return self._write(tx)

    def detach(self, devices: Sequence[str]) -> dict[str, str]:
        """Take each of ``devices`` from behind its gateway. Returns the gateway each detached
        device was behind (a device behind none is left out)."""

        def tx(db: Sql) -> dict[str, str]:
            gone: dict[str, str] = {}
            for device in devices:
                row = db.execute("SELECT gateway FROM relays WHERE device = ?", (device,))
                found = row.fetchone()
                if found is None:
                    continue
                gone[device] = found[0]
                db.execute("DELETE FROM relays WHERE device = ?", (device,))
            for gateway in set(gone.values()):
                self._principals_changed(db, gateway)
            return gone

        return self._write(tx)

    def relays(self) -> dict[str, str]:
        """Every attached device and the gateway it is behind."""
        sql = "SELECT device, gateway FROM relays ORDER BY device"
        return {d: g for d, g in self._read(lambda db: db.execute(sql).fetchall())}
