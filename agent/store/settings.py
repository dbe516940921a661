"""How the queue is configured: the store's constants, the kind codes and default priorities, and
:class:`StoreSettings` (the ``[store]`` table).

Every other module of the package imports from here; this one imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.files import MAX_BUDGET_MB
from agent.wire.records import Kind  # what a record is: decides default priority and eviction order
from drivers.base import Options

# --- constants (tests may shorten the timing ones, in the module that reads them) ----------------
SCHEMA_VERSION = 1
APPLICATION_ID = 0x45414751  # "EAGQ": marks a file as an edge-agent queue
PAGE_SIZE = 4096
WAL_FRAME_HEADER = 24
SEQ_BLOCK = 100_000  # sequence numbers reserved in the side file per fsync of it
SEQ_EPOCH_SCALE = 1_000_000  # a new sequence epoch starts at the wall clock in microseconds
#: An epoch never starts with less room than this above it: an endpoint's ``last`` (or a floor)
#: higher than ``MAX_SEQ - SEQ_HEADROOM`` is not believed (one ack must not use up the space).
SEQ_HEADROOM = 2**62
BUSY_TIMEOUT_SECONDS = 5.0  # how long SQLite waits for a lock held by another connection
RING_RETRY_SECONDS = 1.0  # how often alerts parked in the memory ring retry while the disk is full
KEEP_CORRUPT = 3  # moved-aside corrupt files kept; older ones are deleted
MIN_BUDGET_BYTES = 256 * 1024
DEFAULT_BUDGET_MB = 256.0
DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MEMORY_RING = 1000
#: Seconds readings gather before one commit (agent/sense/ingest.py): fewer writes to flash.
DEFAULT_COMMIT_WINDOW = 1.0
MAX_COMMIT_WINDOW = 60.0
MIN_WAL_BYTES = 64 * 1024
MAX_WAL_BYTES = 4 * 1024 * 1024
RECORD_OVERHEAD = 48  # estimated bytes per row beyond its payload (row header, index entry)
MAX_PRIORITY = 255


# Stored as small integers; the eviction rank is the reverse: telemetry goes first.
KIND_CODE: dict[Kind, int] = {Kind.ALERT: 0, Kind.EVENT: 1, Kind.STATE: 2, Kind.TELEMETRY: 3}
CODE_KIND: dict[int, Kind] = {v: k for k, v in KIND_CODE.items()}
EVICT_ORDER = (3, 2, 1, 0)  # telemetry, state, event, alert
RANK = {code: i for i, code in enumerate(EVICT_ORDER)}  # 0 = evicted first

DEFAULT_PRIORITY: Mapping[Kind, int] = {
    Kind.ALERT: 0,
    Kind.EVENT: 10,
    Kind.STATE: 20,
    Kind.TELEMETRY: 30,
}
"""Default priority per kind. Lower numbers are delivered sooner; valid range 0..255."""
DEFAULT_BY_CODE = {KIND_CODE[k]: p for k, p in DEFAULT_PRIORITY.items()}


@dataclass(frozen=True)
class StoreSettings:
    """How the queue is kept. ``from_options`` reads them from the ``[store]`` table."""

    path: Path
    budget_bytes: int = int(DEFAULT_BUDGET_MB * 1024 * 1024)
    durability: str = "full"  # "full" (synchronous=FULL) or "normal" (synchronous=NORMAL)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    memory_ring: int = DEFAULT_MEMORY_RING  # alert records held in RAM while the disk is full
    commit_window: float = DEFAULT_COMMIT_WINDOW  # s readings gather before one commit (ingest)
    # Not in the TOML table: overrides for tests and benches.
    wal_bytes: int | None = None  # WAL size kept (None: budget/8 within 64 KiB..4 MiB)
    hard_limit_bytes: int | None = None  # PRAGMA max_page_count on the main file (None: none)

    def __post_init__(self) -> None:
        if self.durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {self.durability!r}")
        if self.budget_bytes < MIN_BUDGET_BYTES:
            raise ValueError(f"budget_bytes must be at least {MIN_BUDGET_BYTES}")
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if self.memory_ring < 0:
            raise ValueError("memory_ring must not be negative")
        if not 0.0 <= self.commit_window <= MAX_COMMIT_WINDOW:
            raise ValueError(f"commit_window must be within 0..{MAX_COMMIT_WINDOW:g} s")

    @classmethod
    def from_options(cls, opts: Options, data_dir: Path) -> StoreSettings:
        """Validate the ``[store]`` table (errors name the key) and call ``opts.finish()``.

        Keys: ``path`` (default ``queue.db``, relative to ``data_dir``), ``budget_mb`` (256),
        ``durability`` ("full"), ``lease_seconds`` (60), ``memory_ring`` (1000 alerts),
        ``commit_window`` (1 s).
        """
        raw_path = opts.string("path", "queue.db")
        if not raw_path.strip():
            raise opts.error("path", "is empty")
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            path = Path(data_dir) / path
        budget_mb = opts.number(
            "budget_mb",
            DEFAULT_BUDGET_MB,
            minimum=MIN_BUDGET_BYTES / (1024 * 1024),
            maximum=MAX_BUDGET_MB,
        )
        durability = opts.choice("durability", "full", ("full", "normal"))
        lease = opts.number("lease_seconds", DEFAULT_LEASE_SECONDS, minimum=1.0, maximum=86400.0)
        ring = opts.integer("memory_ring", DEFAULT_MEMORY_RING, minimum=0, maximum=1_000_000)
        window = opts.number(
            "commit_window", DEFAULT_COMMIT_WINDOW, minimum=0.0, maximum=MAX_COMMIT_WINDOW
        )
        opts.finish()
        return cls(
            path=path,
            budget_bytes=int(budget_mb * 1024 * 1024),
            durability=durability,
            lease_seconds=lease,
            memory_ring=ring,
            commit_window=window,
        )

    @property
    def seq_path(self) -> Path:
        return self.path.with_name(self.path.name + ".seq")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def set_aside_path(self) -> Path:
        """Records the endpoint refused, kept out of the queue (agent/store/setaside.py)."""
        return self.path.with_name("rejected")

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def wal_limit(self) -> int:
        """Bytes of WAL kept between checkpoints (journal_size_limit)."""
        if self.wal_bytes is not None:
            return max(4 * PAGE_SIZE, self.wal_bytes)
        return min(MAX_WAL_BYTES, max(MIN_WAL_BYTES, self.budget_bytes // 8))

    def db_target(self) -> int:
        """Bytes of live pages the main file may hold: the budget minus room for the WAL and one
        transaction beyond it."""
        return max(8 * PAGE_SIZE, self.budget_bytes - 2 * self.wal_limit())
