"""The storage seam of the cloud endpoint: the :class:`Storage` Protocol, the values it returns
and its exceptions. Two implementations: :class:`cloud.storage.SQLiteStorage` (the default, one
file) and :class:`cloud.pgstorage.PostgresStorage` (a fleet: several endpoint processes and hosts
on one database). :func:`cloud.storage.open_storage` picks one from a spec.

The contract both keep (tests/unit/cloud/test_storage_contract.py runs it against each):

- Every call that changes something is one transaction; :meth:`Storage.ingest_many` is one
  transaction for all its batches (group commit).
- Ingest stores each (device, seq) once: a record that is already stored is a duplicate and
  changes nothing (the first copy stays); a duplicate whose content differs is a conflict.
- ``arrival`` numbers are unique and strictly increasing in the order records are stored: in
  batch order within a call, and from one call to any call that starts after it returned. They
  may have gaps (PostgreSQL: a rolled-back transaction uses numbers up), and two calls that
  overlap in time (two processes) may commit in either order.
- A failure of the database (I/O error, full disk, connection refused or lost, locked for too
  long, closed) raises :class:`StorageUnavailable` with one line saying what happened, never an
  exception of the database library; the server answers it with 5.03 and a Max-Age.
- Validation verdicts are stored once per (device, seq, window digest): the first copy stays,
  whichever process or host stored it. Published model versions and agent releases are immutable.
- Retention (:meth:`Storage.prune`, cloud/retention.py): what was received before a midnight
  (UTC) goes, records with their keys, features records and verdicts; each device keeps a
  *pruned floor*, the highest seq removed for it, at or below which ingest stores nothing: a
  seq there that is held is a duplicate, one that is not is a conflict (never stored twice,
  never acknowledged unstored), and the ack's ``last`` is at least the floor.
- :meth:`Storage.dump` and :meth:`Storage.load` copy a storage table by table (:data:`TABLES`,
  the same rows on both) for ``edge-agent-cloud migrate`` (cloud/migrate.py). What both
  implementations do alike is written once, over :class:`Sql`, in cloud/storesql.py.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from agent.errors import AgentError
from agent.files import loads_json
from agent.wire import statedoc
from agent.wire.batch import WireRecord, record_time
from agent.wire.credentials import Credential, CredentialError
from agent.wire.statedoc import DesiredDoc, Entry

T = TypeVar("T")

if TYPE_CHECKING:
    import threading

    from cloud.featurestore import StoredFeatures
    from cloud.retention import PruneResult

log = logging.getLogger("cloud.storage")


class StorageUnavailable(AgentError):
    """The database cannot do the work now (I/O error, full disk, locked, closed)."""


class DataRefused(StorageUnavailable):
    """The database refuses a value of the request (PostgreSQL: text with a NUL character, a
    number beyond its column's range): the request's fault, nothing was stored, and sending it
    again will not help. The text names the refusal, never the storage (it may go to the peer:
    the server answers it 4.00). A :class:`StorageUnavailable` for callers that know no better."""


class MigrationRefused(AgentError):
    """A migrate may not start filling this storage: it holds data, or another migrate marked
    it first (:meth:`Storage.set_migration`); nothing was changed."""


class DuplicateKeyId(AgentError):
    """A new credential's OSCORE key id belongs to another principal (make another)."""


class CredentialChanged(AgentError):
    """A conditional credential write found another generation stored, or a revocation, than the
    caller read: another process rekeyed, rotated or revoked it meanwhile; nothing was written."""


class UnknownDevice(AgentError):
    """The device is not registered."""

    device: str | None = None  # which one, for the command line's fix

    @classmethod
    def of(cls, device: str, where: str = "") -> UnknownDevice:
        err = cls(f"device {device!r} is not registered" + (f" in {where}" if where else ""))
        err.device = device
        return err


class PreconditionFailed(AgentError):
    """An If-Match ETag does not match the current desired document."""


class DocumentTooLarge(AgentError):
    """A state document would grow beyond its limit (bytes of desired state, keys of reported)."""

    def __init__(
        self, size: int, limit: int, what: str = "the desired document", unit: str = "bytes"
    ) -> None:
        super().__init__(f"{what} would have {size} {unit}, over the limit of {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class StoredRecord:
    """A record as the endpoint holds it. ``time`` is the time inside the body (``created`` when
    the body has none); ``received`` is when the endpoint stored it; ``arrival`` numbers the
    records of all devices in the order they were stored (within a batch: batch order)."""

    device: str
    seq: int
    kind: str
    created: float
    time: float
    received: float
    arrival: int
    body: bytes


@dataclass(frozen=True)
class IngestResult:
    """What a batch did: every seq of the batch (all are stored now) and the counts."""

    seqs: tuple[int, ...]
    new: int
    duplicate: int
    conflict: int  # duplicates whose stored copy differs from the one just received
    conflicts: tuple[int, ...] = ()  # their seqs: not acknowledged (another record holds them)
    last: int | None = None  # the highest seq stored for the device, after this batch


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    registered: float
    last_seen: float | None
    records: int
    last_seq: int | None
    desired_rev: int


@dataclass(frozen=True)
class ReportedResult:
    """The version now stored for each key of a reported PUT, and whether desired state changed
    (a model failure blocked a desired version)."""

    versions: dict[str, int]
    desired: DesiredDoc
    desired_changed: bool
    refused: dict[str, int] = field(default_factory=dict)  # key => version beyond the limit


#: The highest number :meth:`Storage.reserve_sequence` hands out (a signed 64-bit column).
MAX_SEQUENCE = 2**63 - 1

#: One batch of :meth:`Storage.ingest_many`: (device, records, register the device if unknown).
Batch = tuple[str, Sequence[WireRecord], bool]

#: One verdict of :meth:`Storage.put_verdicts`: (device, seq, window digest, the verdict's CBOR).
Verdict = tuple[str, int, str, bytes]


@dataclass(frozen=True)
class ModelVersion:
    """A published model version: its signed manifest (CBOR) and when it was published."""

    name: str
    version: str
    manifest: bytes
    published: float


@dataclass(frozen=True)
class ReleaseVersion:
    """A published agent release: its signed manifest (CBOR) and when it was published."""

    version: str
    manifest: bytes
    published: float


@dataclass(frozen=True)
class Table:
    """A logical table of :meth:`Storage.dump` and :meth:`Storage.load`: its columns in row
    order, the columns of its key (unique, the order of a dump), and whether a stored row may
    change (``mutable``: a load replaces it) or is written once."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    mutable: bool = False


#: Every logical table of a storage, in the order a migrate copies them. ``devices``: ``pruned``
#: is the device's pruned floor (cloud/retention.py); ``verdicts``: ``n`` numbers them in the
#: order they were stored (the first verdict of a seq is the lowest), ``received`` is when;
#: ``sequences``: the OSCORE sender sequence counters (:meth:`Storage.reserve_sequence`);
#: ``link_history``: ``value`` is a text (link/state) or a number.
TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table("devices", ("id", "registered", "last_seen", "desired_rev", "pruned"), ("id",), True),
        Table(
            "credentials",
            ("principal", "role", "kid", "doc", "created", "revoked"),
            ("principal",),
            True,
        ),
        Table(
            "records",
            ("device", "seq", "kind", "created", "time", "received", "arrival", "body"),
            ("device", "seq"),
        ),
        Table(
            "reported",
            ("device", "key", "version", "value", "updated"),
            ("device", "key"),
            True,
        ),
        Table(
            "desired",
            ("device", "key", "version", "value", "updated", "blocked"),
            ("device", "key"),
            True,
        ),
        Table(
            "link_history",
            ("device", "key", "time", "version", "value"),
            ("device", "key", "time", "version"),
        ),
        Table("verdicts", ("n", "device", "seq", "digest", "body", "received"), ("n",)),
        Table("models", ("name", "version", "manifest", "data", "published"), ("name", "version")),
        Table("sequences", ("principal", "reserved"), ("principal",)),
        # features records (cloud/featurestore.py)
        Table(
            "features",
            (
                "device",
                "first_seq",
                "last_seq",
                "sensor",
                "t0",
                "t1",
                "count",
                "received",
                "body",
            ),
            ("device", "first_seq"),
        ),
        # federated learning (cloud/learnstore.py)
        Table("learn_jobs", ("id", "model", "doc", "rev", "created", "updated"), ("id",), True),
        Table("learn_blobs", ("sha", "data"), ("sha",)),
        Table(
            "learn_updates",
            ("job", "round", "device", "body", "received"),
            ("job", "round", "device"),
        ),
        # which gateway each device is behind (cloud/relaystore.py)
        Table("relays", ("device", "gateway", "updated"), ("device",), True),
        # remote commands (cloud/commandstore.py)
        Table(
            "commands",
            ("device", "id", "name", "args", "sent", "status", "result", "at", "updated"),
            ("device", "id"),
            True,
        ),
        Table(
            "logs",
            ("device", "n", "received", "since", "count", "left_out", "body"),
            ("device", "n"),
        ),
        # groups and the release history (cloud/releasestore.py); the releases themselves are
        # copied file by file after the tables (cloud/migrate.py copy_releases)
        Table("release_groups", ("name", "version", "sha256", "updated"), ("name",), True),
        Table("group_members", ("grp", "device", "added"), ("grp", "device")),
        Table(
            "release_history",
            ("device", "n", "version", "result", "at", "reason", "received"),
            ("device", "n"),
        ),
    )
}


class Sql:
    """A database connection (sqlite3 or psycopg: both have ``execute``) that takes SQL with
    ``?`` placeholders in either dialect, so that code reading both storages is written once.
    ``dialect`` is ``"sqlite"`` or ``"postgresql"``; only the placeholders are translated (and
    a ``%`` doubled for psycopg), so the SQL itself must be common to both."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect

    def text(self, sql: str) -> str:
        if self.dialect == "sqlite":
            return sql
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """The cursor of ``sql``: ``fetchone()``, ``fetchall()``, iteration, ``rowcount``."""
        return self.conn.execute(self.text(sql), args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.dialect == "sqlite":
            self.conn.executemany(sql, rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.text(sql), rows)


class SqlTables:
    """Base of the mixins that add tables to both storages (cloud/learnstore.py,
    relaystore.py, commandstore.py): how one read and one write transaction run, which
    :class:`cloud.storesql.SharedStorage`'s backends supply."""

    def _read(self, fn: Callable[[Sql], T]) -> T:
        raise NotImplementedError

    def _write(self, fn: Callable[[Sql], T]) -> T:
        raise NotImplementedError


@runtime_checkable
class Storage(Protocol):
    """What the endpoint needs from a database. Calls are blocking; one thread makes them."""

    def add_device(self, device: str, now: float) -> bool:
        """Register ``device``; False if it was registered already."""

    def device(self, device: str) -> DeviceInfo | None: ...

    def devices(self) -> list[DeviceInfo]: ...

    def ingest(
        self, device: str, records: Sequence[WireRecord], now: float, register: bool = False
    ) -> IngestResult:
        """Store each record once. Unknown device: :class:`UnknownDevice`, or register it.
        The same as ``ingest_many([(device, records, register)], now)[0]``, raised if an error."""

    def ingest_many(self, batches: Sequence[Batch], now: float) -> list[IngestResult | AgentError]:
        """Store several batches in ONE transaction and one commit (group commit), each as
        :meth:`ingest` would, in order (a record sent twice within the call is a duplicate the
        second time). Each slot of the answer is the batch's :class:`IngestResult`, or the
        :class:`UnknownDevice` of a batch for an unregistered device (``register`` False), which
        stores nothing while the others commit. A failure of the database raises
        :class:`StorageUnavailable` and nothing is stored."""

    def records(
        self,
        device: str,
        since: float | None = None,
        limit: int | None = None,
        by_arrival: bool = False,
    ) -> list[StoredRecord]:
        """The device's records in seq order (or arrival order); ``since``: only those with
        ``time >= since``."""

    def features(
        self, device: str, since: float | None = None, limit: int | None = None
    ) -> list[StoredFeatures]:
        """The device's features records (cloud/featurestore.py) in seq order; ``since``: only
        those whose last reading is at or after it."""

    def seqs(self, device: str) -> list[int]:
        """Every stored seq of the device, ascending."""

    def counts(self, device: str) -> dict[str, int]:
        """How many records of each kind the device has stored."""

    def reported(self, device: str) -> dict[str, Entry]: ...

    def reported_keys(
        self, devices: Sequence[str], keys: Sequence[str]
    ) -> dict[str, dict[str, Entry]]:
        """The entries of ``keys`` each of ``devices`` reported, by device; a device that
        reported none of them is absent (the learning coordinator's look at the devices of a
        round: a few keys of many devices, without their whole reported state)."""

    def put_reported(
        self, device: str, entries: Mapping[str, Entry], now: float, max_keys: int | None = None
    ) -> ReportedResult:
        """Merge reported entries by their keys' rules (:mod:`agent.wire.statedoc`);
        :class:`DocumentTooLarge` if the device would have more than ``max_keys`` keys. An entry
        whose version is above :func:`agent.wire.statedoc.version_limit` is refused (left out
        of ``versions``, named in ``refused``); the others are merged."""

    def desired(self, device: str) -> DesiredDoc: ...

    def put_desired(
        self,
        device: str,
        changes: Mapping[str, Any],
        now: float,
        if_match: Sequence[bytes] | None = None,
        max_bytes: int | None = None,
    ) -> tuple[DesiredDoc, list[str]]:
        """Apply operator changes; (new document, changed keys)."""

    def data_version(self) -> int:
        """A number that changes when another connection commits (to notice CLI writes)."""

    def changes(self, token: object | None) -> tuple[object, frozenset[str] | None, bool]:
        """What others changed since ``token`` (a token an earlier call returned): (the new
        token, the devices whose desired document may have changed, whether credentials may have
        changed). The devices are None when unknown: re-read every observed device. ``token``
        None (the first call) only starts: ``(token, frozenset(), False)``. A change made
        through this same object may or may not be reported."""

    def reserve_sequence(self, principal: str, count: int, at_least: int = 0) -> int:
        """The start ``s`` of a block ``[s, s + count)`` of OSCORE sender sequence numbers for
        ``principal``: above every block returned before for it (by any process or host sharing
        this storage), ``>= at_least``, and committed before it returns."""

    def put_credential(
        self,
        credential: Credential,
        now: float,
        *,
        replaces: int | None = None,
        unrevoke: bool = True,
    ) -> None:
        """Register or replace (re-key) a principal's credential; :class:`DuplicateKeyId` when
        its key id belongs to another principal.

        ``replaces``: write only if the stored credential is of that generation (0: none is
        stored; a principal with none stored is registered whatever the number, credentials
        are never deleted), in the same transaction as the check, and, unless ``unrevoke``,
        only if it is not revoked; :class:`CredentialChanged` otherwise. A read-then-write
        caller (a rekey, a rotation) passes the generation it read, so two of them, or one
        and a revocation, in different processes cannot both take effect. A replaced
        credential is valid again (a rekey of a revoked principal re-admits it): a rotation
        passes ``unrevoke=False``."""

    def revoke(self, principal: str, now: float) -> bool:
        """Refuse the principal from now on; False if it has no credential."""

    def credentials(self) -> list[tuple[Credential, bool]]:
        """Every credential, with whether it is revoked."""

    # -- gateways (cloud/relaystore.py) ----------------------------------------------------------

    def attach(self, gateway: str, devices: Sequence[str], now: float) -> dict[str, str | None]:
        """Put registered ``devices`` behind ``gateway`` (one transaction; the gateway each was
        behind before); :class:`UnknownDevice` for one that is not registered. Noticed by
        :meth:`changes` as a credential change."""

    def detach(self, devices: Sequence[str]) -> dict[str, str]:
        """Take ``devices`` from behind their gateways; the gateway each was behind."""

    def relays(self) -> dict[str, str]:
        """Every attached device -> the gateway it is behind."""

    def storage_id(self) -> str:
        """This storage's identity: endpoints that share it are one deployment (a device may
        fall back between them); another storage is another deployment. 16 hex digits of a
        random 63-bit number chosen when the storage was made (or taken over from the storage
        a migrate copied: :meth:`set_migration`)."""

    # -- validation verdicts (cloud/inference.py) ------------------------------------------------

    def verdict(self, device: str, seq: int, digest: str | None = None) -> bytes | None:
        """The stored verdict (its CBOR) of the alert ``seq`` on the window ``digest``; with
        ``digest`` None, the first one stored for the seq."""

    def put_verdicts(self, items: Sequence[Verdict], now: float | None = None) -> list[bytes]:
        """Store each (device, seq, digest) verdict once, in ONE transaction: one already stored
        stays (the first copy wins, also when another host stored it meanwhile). Returns, for
        each item, the verdict that is stored now. ``now``: when it was received (retention;
        None: the wall clock)."""

    # -- retention (cloud/retention.py) ----------------------------------------------------------

    def prune(
        self, before: float, *, dry_run: bool = False, stop: threading.Event | None = None
    ) -> PruneResult:
        """Remove what was received before the midnight (UTC) of ``before``'s day: records (body
        and key), features records, verdicts; raise each device's pruned floor to the highest
        seq removed for it first or in the same transaction. In bounded transactions (a server
        on the same storage goes on meanwhile); ``dry_run``: count only, change nothing;
        ``stop`` set: end after the transaction running (the result says ``stopped``).
        :class:`cloud.retention.PruneBusy` when another prune holds the storage's prune lock
        (PostgreSQL) or a lock it needs was held too long."""

    # -- published models (cloud/models.py) ------------------------------------------------------

    def put_model(
        self, name: str, version: str, manifest: bytes, data: bytes, published: float
    ) -> bool:
        """Publish a model version (its signed manifest and its file); False, and nothing
        changed, when that version is published already (versions are immutable)."""

    def models(self, name: str | None = None) -> list[ModelVersion]:
        """The published versions (of ``name``), by name then version; without their files."""

    def model(self, name: str, version: str) -> ModelVersion | None: ...

    def model_file(self, name: str, version: str) -> bytes | None:
        """The file of a published version, as it is stored (the caller verifies it)."""

    # -- agent releases, groups, release history (cloud/releasestore.py) -------------------------

    def put_release(self, version: str, manifest: bytes, file: Path, published: float) -> bool:
        """Publish a release: its signed manifest and the file at ``file`` (read in blocks, never
        whole); False, and nothing changed, when that version is published already."""

    def releases(self) -> list[ReleaseVersion]:
        """The published releases, by version; without their files."""

    def release(self, version: str) -> ReleaseVersion | None: ...

    def release_file(self, version: str, out: Path) -> int | None:
        """Write the stored file of ``version`` to ``out`` as it is stored (the caller verifies
        it); its size, None when the version is not published."""

    def group_add(self, name: str, devices: Sequence[str], now: float) -> tuple[Any, list[str]]:
        """Add registered devices to a group (made when new): (the group, the new members)."""

    def group_remove(self, name: str, devices: Sequence[str]) -> list[str]:
        """Take devices out of a group: the ones that were members."""

    def groups(self, name: str | None = None) -> list[Any]:
        """Every group (or the one named) with its members and release."""

    def device_groups(self, device: str) -> list[str]: ...

    def set_group_release(self, name: str, version: str, sha256: str, now: float) -> Any:
        """Assign a release to a group; the group."""

    def note_assignment(self, device: str, version: str, reason: str, now: float) -> None: ...

    def release_history(self, device: str, limit: int = ...) -> list[Any]:
        """The device's reported update outcomes and assignments, newest first."""

    def release_outcomes(self, version: str) -> list[Any]:
        """Each device's latest history row of ``version``, by device."""

    # -- the dashboard's queries (cloud/dashdata.py) ---------------------------------------------

    def reader(self) -> AbstractContextManager[Sql]:
        """Read-only SQL on this storage's tables for the dashboard: ``?`` placeholders, the
        dialect named by ``Sql.dialect``. Errors of the database are :class:`StorageUnavailable`.
        """

    # -- bulk copy (cloud/migrate.py) ------------------------------------------------------------

    def table_count(self, table: str) -> int:
        """How many rows the logical ``table`` (one of :data:`TABLES`) holds."""

    def dump(self, table: str, after: tuple[Any, ...] | None, limit: int) -> list[tuple[Any, ...]]:
        """At most ``limit`` rows of ``table`` (its :data:`TABLES` columns) whose key comes
        after ``after`` (None: from the first), in key order (keyset pagination: bounded memory
        and a restart from any key)."""

    def load(self, table: str, rows: Sequence[tuple[Any, ...]]) -> int:
        """Write rows as :meth:`dump` gives them, in ONE transaction. A row whose key is stored
        already is replaced when the table is ``mutable`` (devices, credentials, state: the copy
        follows the source) and left as it is otherwise (records, link history, verdicts,
        models are written once: nothing is copied twice); of the OSCORE sequence counters the
        larger stays. Keeps the counters above what was loaded: the arrival numbers and the
        verdicts' order. Returns how many rows were written."""

    def migration(self) -> str | None:
        """The storage id of the source an unfinished migrate is filling this storage from."""

    def set_migration(self, source_id: str, done: bool = False) -> None:
        """Mark this storage as being filled by a migrate from the storage ``source_id``; with
        ``done``, end it: this storage takes ``source_id`` as its own id and the mark goes."""

    def close(self) -> None: ...


def check_block(count: int, at_least: int) -> None:
    """The arguments of :meth:`Storage.reserve_sequence` are sane (ValueError if not)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, not {count!r}")
    if isinstance(at_least, bool) or not isinstance(at_least, int) or at_least < 0:
        raise ValueError(f"at_least must be a non-negative integer, not {at_least!r}")
    if at_least + count > MAX_SEQUENCE:
        raise ValueError(f"a block of {count} from {at_least} is beyond {MAX_SEQUENCE}")


@dataclass
class ReportedMerge:
    """What a reported PUT changes (:func:`merge_reported`); the storage writes ``writes``."""

    versions: dict[str, int] = field(default_factory=dict)  # key => version stored after
    refused: dict[str, int] = field(default_factory=dict)  # key => version beyond the limit
    failures: dict[str, int] = field(default_factory=dict)  # model key => failed desired version
    writes: list[tuple[str, Entry]] = field(default_factory=list)  # merged entries to store


def merge_reported(
    device: str, stored: Mapping[str, Entry], entries: Mapping[str, Entry], now: float
) -> ReportedMerge:
    """Merge reported ``entries`` into the ``stored`` ones by their keys' rules, refusing
    versions above :func:`agent.wire.statedoc.version_limit` (both storages use this)."""
    out = ReportedMerge()
    for key, incoming in entries.items():
        current = stored.get(key)
        limit = statedoc.version_limit(now, current)
        if incoming.version > limit:
            out.refused[key] = incoming.version
            log.warning(
                "event=reported_version_refused device=%s key=%s version=%d limit=%d",
                device,
                key,
                incoming.version,
                limit,
            )
            continue
        merged = statedoc.merge_reported(current, incoming, statedoc.rule_for(key))
        if merged is not None:
            out.writes.append((key, merged))
            failed = statedoc.model_failure(key, merged)
            if failed is not None:
                out.failures[key] = failed
            current = merged
        assert current is not None
        out.versions[key] = current.version
    return out


_SECRET_WORDS = re.compile(r"(?i)\b(password|passfile|sslpassword)(\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def describe(spec: str | Path) -> str:
    """``spec`` fit for a log line or an error message: any password in it is masked."""
    text = str(spec)
    if not text.startswith(("postgresql://", "postgres://")):
        return _SECRET_WORDS.sub(r"\1\2***", text)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hosts = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{hosts}"
        query = [
            (k, "***" if k.lower() in ("password", "passfile", "sslpassword") else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*"), ""))
    except ValueError:
        return f"{text.split(':', 1)[0]}://***"


def finite_float(value: Any) -> float | None:
    """A stored or received number as a float; None for what is not one (bool, text) or none a
    float holds: not finite, or an integer beyond a float's range (a CBOR bignum an older
    endpoint stored before the strict decoder refused them)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def time_not_finite(device: str, rec: WireRecord) -> bool:
    """Whether ``rec``'s ``created`` or time is not a finite number (the decoders refuse such
    records; a storage refuses them again: SQLite would store NaN as NULL, PostgreSQL as NaN).
    Such a record is refused alone, logged here: not stored, not acknowledged."""
    if finite_float(rec.created) is not None and finite_float(record_time(rec)) is not None:
        return False
    log.warning(
        "event=record_refused device=%s seq=%d detail=time_not_finite created=%r",
        device, rec.seq, rec.created,
    )  # fmt: skip
    return True


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line for a log or a :class:`StorageUnavailable`: its kind and text."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:limit] if text else type(err).__name__


def device_ids(storage: Storage) -> list[str]:
    """The registered devices' ids, in order: what discovery lists, without the registry
    entries' counts of records (:meth:`Storage.devices`), which read every device's records."""
    with storage.reader() as db:
        return [row[0] for row in db.execute("SELECT id FROM devices ORDER BY id").fetchall()]


def records_query(
    mark: str, device: str, since: float | None, limit: int | None, by_arrival: bool
) -> tuple[str, list[Any]]:
    """The SELECT of :meth:`Storage.records` and its arguments, with ``mark`` as the
    placeholder (``?`` for SQLite, ``%s`` for psycopg)."""
    sql = (
        "SELECT device, seq, kind, created, time, received, arrival, body FROM records"
        f" WHERE device = {mark}"
    )
    args: list[Any] = [device]
    if since is not None:
        sql += f" AND time >= {mark}"
        args.append(since)
    sql += " ORDER BY arrival" if by_arrival else " ORDER BY seq"
    if limit is not None:
        sql += f" LIMIT {mark}"
        args.append(limit)
    return sql, args


def desired_doc(
    device: str, rev: int, rows: Iterable[tuple[Any, Any, Any, Any]], store: str
) -> DesiredDoc:
    """The desired document from its ``(key, version, value, blocked)`` rows. A value written
    around the endpoint's checks (too deep to decode: served as its bytes, and the device refuses
    that key) never makes the document unreadable; one that is not CBOR at all (corrupted at
    rest) is left out, with a warning."""
    entries: dict[str, Entry] = {}
    blocked: dict[str, int] = {}
    for key, version, value, block in rows:
        try:
            entries[key] = Entry(version, statedoc.decode_stored(value))
        except statedoc.StateError as err:
            log.warning(
                "event=desired_value_unreadable device=%s key=%r version=%s error=%r "
                "action=left_out",
                device,
                key,
                version,
                str(err)[:200],
            )
            continue
        if block is not None:
            blocked[key] = block
    return DesiredDoc(rev, entries, blocked, store)


def credentials_of(rows: Iterable[tuple[Any, Any]]) -> list[tuple[Credential, bool]]:
    """The credentials table's rows (doc, revoked) as (credential, revoked); a row that does not
    decode (a damaged database) is logged and left out, never raised at the endpoint's start."""
    out = []
    for doc, revoked in rows:
        try:
            out.append((Credential.from_json(loads_json(doc)), revoked is not None))
        except (ValueError, CredentialError) as err:
            log.error("event=credential_unreadable error=%s", err)
    return out
