"""Updates in the running agent: desired ``agent/version``, staging, READY, reported state.

- ``agent/version`` = ``{"version": V, "sha256": 64 hex}`` (set by an operator for a device or a
  group) names a release; a version other than the running one is staged in the background
  (agent/ota/updater.py :func:`~agent.ota.updater.stage`: signed manifest, disk budget, resumable
  download, SHA-256). The root helper (edge-agent-update.service) installs and switches it and
  restarts the service; the agent itself never writes the release root.
- Once this process is READY (sensors read, the queue open: READY=1) and a sync exchange has
  succeeded (a batch acknowledged), it writes the READY marker of the running version
  (:func:`~agent.ota.updater.mark_ready`): the boot counter then confirms the release instead
  of rolling it back.
- Reported: ``agent/version`` (the running release) and ``agent/update`` (the last outcome:
  ``staged``, ``refused`` with the reason, ``updated``, ``rolled_back`` with the reason, and
  ``pending`` while a new release has not confirmed yet).

A refused release (bad signature, wrong SHA-256, over the budget) is not tried again until the
desired value changes; a link failure is retried with backoff, resuming the download. A release
the root helper had no room to install (its outcome ``waiting``; or taken with no outcome it
could save on a full disk) is staged again, with backoff, until it is switched to or refused:
from the verified file the helper kept in ``DATA/ota`` (its SHA-256 checked again; fetched
again only when it no longer matches), and only once the release root has more room than when
it was handed over (until then ``waiting``, saying so). A ``waiting`` whose cause is the staged
file missing (a power cut during an install left the helper neither the agent's file nor a
checked copy of its own) is not a lack of room: the release is staged again (fetched) after the
backoff, without waiting for room. Only the wanted release is kept there: the files of any other
(no longer desired, refused, or the one running) are removed. A release ``staged.json`` already
hands to the root helper (staged before this process started: a power cut during the helper's
install, which it resumes from root's copy) is not staged again: this process watches the
helper's outcome for it, as after a staging of its own.

A release rolled back or refused on this device by root (the root's last outcome in
``update.json``, :data:`HELD_RESULTS`: ``rolled_back`` of that version, by the boot counter, the
health timer, the OnFailure unit or the operator; ``refused`` by the root helper: pip failed, the
signature, the floor or the data check, a release file not the signed one) is tried at most once
per assignment: while desired ``agent/version`` still names it, it is not staged again (no
download), and ``agent/update`` keeps saying ``rolled_back`` or ``refused`` with the reason. The
assignment standing when this process starts (its first :meth:`UpdateController.apply`) counts
as the one it ended under; each later apply is a new write of the key (the endpoint gives
setting the same value no new version: an operator withdraws it and assigns it again), which
tries it once more. Derived from ``update.json`` at each look, so it holds across restarts. The
root's ``waiting`` is not held (staged again, as above). A refusal of the agent's own staging
(the signature, the SHA-256, the floor, the budget: before the root helper sees it) is held by
this process only (``_refused``), until the desired value changes; after a restart it is tried
again, and refused again before a block of the file is fetched but for a file that did not
match.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import ModelError, NotNow, SyncError
from agent.modelstore.fetch import BLOCK_WINDOW
from agent.modelstore.signing import load_public_key
from agent.ota import bootcheck
from agent.ota.release import ReleaseError, ReleaseManifest
from agent.ota.settings import UpdateSettings
from agent.ota.updater import (
    KEPT_SUFFIXES,
    OTA_DIR,
    STAGED_FILE,
    STAGED_FILE_MISSING,
    TAKEN_FILE,
    ReleaseFetcher,
    Staged,
    drop_unwanted,
    mark_ready,
    report,
    root_free,
    stage,
    staged_version,
)
from agent.wire.statedoc import agent_version

log = logging.getLogger(__name__)

RETRY_BASE = 30.0  # seconds before a failed download is tried again (doubled up to RETRY_MAX)
RETRY_MAX = 1800.0
ACK_POLL = 1.0  # seconds between looks at the uplink's acknowledged batches (before READY)
ROOT_POLL = 30.0  # seconds between looks at what the root helper did with a staged release
ROOM_GAIN = 1 << 20  # bytes more free in the release root than at a hand-off that had no room
#: the root's outcomes (update.json) that hold a release while its assignment stands (docstring)
HELD_RESULTS = ("rolled_back", "refused")


def _since(outcome: dict[str, Any], version: str, since: float) -> bool:
    """The root helper's outcome is of ``version``, written at or after ``since``."""
    at = outcome.get("at")
    return outcome.get("version") == version and isinstance(at, (int, float)) and at >= since


def _outcome(version: str, result: str, **fields: Any) -> dict[str, Any]:
    """An outcome of this process for the reported ``agent/update``, stamped now."""
    return {"version": version, "result": result, **fields, "at": time.time()}


def check_value(value: Any) -> tuple[str, str] | None:
    """(version, sha256) of a desired ``agent/version``; None for null (no assignment).
    ValueError names what is expected."""
    if value is None:
        return None
    expected = agent_version(value)
    if expected is not None:
        raise ValueError(f"agent/version: expected {expected}")
    return value["version"], value["sha256"]


class UpdateController:
    """The agent's part of an update (module docstring)."""

    def __init__(
        self,
        settings: UpdateSettings,
        data_dir: Path,
        fetcher: Callable[[], ReleaseFetcher],
        clock: Any,
        acked: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self._fetcher = fetcher
        self.clock = clock
        self._acked = acked
        self._wanted: tuple[str, str] | None = None
        self._refused: tuple[str, str] | None = None
        self._applied = False  # an assignment applied: the first is the one standing at start
        # the root's rollback or refusal a later assignment of its version tries once more
        self._retry: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._after: asyncio.Task[None] | None = None  # watching the root helper (_after_root)
        self._root_delay = RETRY_BASE
        # (wanted, free bytes in the release root when it was handed over, the helper's reason)
        self._no_room: tuple[tuple[str, str], int, str] | None = None
        self.outcome: dict[str, Any] | None = None  # this process's last staging outcome
        self._root_then: Any = None  # the root's outcome when ``outcome`` was made (reported)
        # the release this process runs: read once, since a switch moves ``current`` under it
        self.running = bootcheck.link_version(settings.root, bootcheck.CURRENT)

    def apply(self, value: Any) -> None:
        wanted = check_value(value)
        if wanted is not None and self.settings.public_key is None:
            raise ValueError("agent/version: this agent has no [update] public_key")
        if wanted != self._wanted:
            self._root_delay = RETRY_BASE
        # assigned again after a rollback or root's refusal: tried once more (module docstring)
        self._retry = self._ended(wanted[0]) if wanted and self._applied else None
        self._applied = True
        self._wanted = wanted
        self._wake.set()

    def ready(self) -> None:
        """READY=1 was sent (sensors read, queue open)."""
        self._ready.set()

    def reported(self) -> dict[str, Any]:
        state = report(self.settings.root)
        # the newer of this process's outcome and the root's: the root's once it is another
        # than when this process made its own (never by their wall-clock times: a device
        # without an RTC stamps 1970 until NTP, and an outcome stamped then would never show)
        root = state.get("outcome")
        mine = self.outcome is not None and (not isinstance(root, dict) or root == self._root_then)
        outcome = self.outcome if mine else root if isinstance(root, dict) else None
        if state.get("pending"):
            outcome = {"version": state["pending"], "result": "pending"}
        return {"agent/version": self.running, "agent/update": outcome}

    async def run(self) -> None:
        await asyncio.gather(self._confirm(), self._stage_loop())

    async def _confirm(self) -> None:
        await self._ready.wait()
        while not self._acked():
            await self.clock.sleep(ACK_POLL)
        version = self.running
        if version is not None:
            pending = mark_ready(self.settings.root, self.data_dir, version)
            log.info("event=release_ready version=%s was_pending=%s", version, pending)

    async def _stage_loop(self) -> None:
        try:
            await self._stage_forever()
        finally:
            if self._after is not None:
                self._after.cancel()

    async def _stage_forever(self) -> None:
        delay = RETRY_BASE
        while True:
            await self._wake.wait()
            self._wake.clear()
            wanted = self._wanted
            if (
                wanted is None
                or wanted[0] == self.running
                or wanted == self._refused
                or self._held(wanted)
            ):
                self._drop_unwanted()
                continue
            if self._after is not None:
                self._after.cancel()
            try:
                since = self._handed_over(wanted)  # after a restart: not downloaded again
                free: int | None = None
                if since is None:
                    since = time.time()
                    free = (await self._stage(*wanted)).root_free
                delay = RETRY_BASE
                self._after = asyncio.create_task(self._after_root(wanted, since, free))
            except ReleaseError as err:
                self._refused = wanted
                self._said(_outcome(wanted[0], "refused", reason=str(err)))
                log.error("event=release_refused version=%s error=%s", wanted[0], err)
                self._drop_unwanted()
            except (SyncError, ModelError, NotNow, OSError) as err:
                what = "download_failed"
                if isinstance(err, NotNow):  # said, and tried again: not a refusal
                    self._said(_outcome(wanted[0], "waiting", reason=str(err)))
                    what = "waiting"
                log.warning(
                    "event=release_%s version=%s retry_in=%gs error=%s", what, wanted[0], delay, err
                )
                await self.clock.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()

    async def _after_root(
        self, wanted: tuple[str, str], since: float, root_free: int | None
    ) -> None:
        """What the root helper made of the release staged at ``since`` (``root_free`` bytes
        free in the release root then): once it has taken it (``DATA/ota/staged.json`` gone), a
        switch or a refusal ends this; ``waiting`` (no room to install) or no outcome at all
        (none it could save on a full disk) stages it again after a backoff that doubles for
        the same release, once there is more room (:meth:`_wait_for_room`); a ``waiting`` for
        a missing staged file, after the backoff alone."""
        staged = self.data_dir / OTA_DIR / STAGED_FILE
        while self._wanted == wanted:
            await self.clock.sleep(ROOT_POLL)
            if staged.exists():
                continue
            state = report(self.settings.root)
            if state.get("pending") == wanted[0]:
                return  # switched; the restart follows
            outcome = state.get("outcome")
            if not isinstance(outcome, dict) or not _since(outcome, wanted[0], since):
                outcome = {}  # none for this staging
            if outcome and outcome.get("result") != "waiting":
                return  # a refusal is held from update.json (_held), as a rollback is
            reason = str(outcome.get("reason", "the root helper took it and saved no outcome"))
            if outcome.get("cause") == STAGED_FILE_MISSING:
                self._no_room = None  # not a lack of room: fetched and staged again
            elif root_free is not None:
                self._no_room = (wanted, root_free, reason)
            log.warning(
                "event=release_install_waiting version=%s retry_in=%gs reason=%s",
                wanted[0],
                self._root_delay,
                reason,
            )
            await self.clock.sleep(self._root_delay)
            self._root_delay = min(self._root_delay * 2, RETRY_MAX)
            if self._wanted == wanted:
                self._wake.set()
            return

    def _handed_over(self, wanted: tuple[str, str]) -> float | None:
        """When ``DATA/ota/staged.json`` already hands ``wanted`` to the root helper (staged
        by this agent before a restart, e.g. a power cut during the helper's install, which
        it resumes from root's copy): the time it was handed over, from which the helper's
        outcome counts (:meth:`_after_root`; not after now, should the clock have been set
        back at boot); None when it is to be staged. Its manifest must name the wanted
        SHA-256, and the file be there or root's copy (the helper's) in the release root."""
        version, sha256 = wanted
        ota = self.data_dir / OTA_DIR
        if staged_version(self.data_dir) != version:
            return None  # nothing staged, or another version (staging the wanted one replaces it)
        try:
            manifest = ReleaseManifest.from_cbor((ota / f"{version}.manifest").read_bytes())
            handed = (ota / STAGED_FILE).stat().st_mtime
        except (OSError, ModelError):
            return None
        if manifest.version != version or manifest.sha256 != sha256.lower():
            return None
        taken = self.settings.root / TAKEN_FILE
        if not (ota / f"{version}.release").exists() and not taken.exists():
            return None
        self._said(_outcome(version, "staged", bytes=manifest.size))
        log.info("event=release_already_staged version=%s", version)
        return min(handed, time.time())

    def _ended(self, version: str) -> dict[str, Any] | None:
        """The root's last outcome (``update.json``) when it ended ``version`` here: rolled
        back or refused (:data:`HELD_RESULTS`)."""
        outcome = report(self.settings.root).get("outcome")
        if isinstance(outcome, dict) and outcome.get("result") in HELD_RESULTS:
            return outcome if outcome.get("version") == version else None
        return None

    def _held(self, wanted: tuple[str, str]) -> bool:
        """``wanted`` was rolled back or refused by root here under this assignment: not staged
        again (the module docstring)."""
        ended = self._ended(wanted[0])
        if ended is None or ended == self._retry:
            return False
        log.info(
            "event=release_held version=%s result=%s restored=%s reason=%s",
            wanted[0],
            ended.get("result"),
            ended.get("restored"),
            ended.get("reason"),
        )
        return True

    def _wait_for_room(self, wanted: tuple[str, str]) -> None:
        """NotNow (``waiting``, with the reason) while the release root has no more room (by
        :data:`ROOM_GAIN`) than when the root helper last had too little for ``wanted``: the
        kept file is not handed over again for it to fail the same way."""
        if self._no_room is None or self._no_room[0] != wanted:
            return
        _, then, reason = self._no_room
        free = root_free(self.settings.root)
        if free is not None and free < then + ROOM_GAIN:
            raise NotNow(
                f"release {wanted[0]}: the root helper had no room to install it ({reason}); "
                f"{free} bytes free in {self.settings.root}, {then} when it tried; waiting for "
                "free space"
            )
        self._no_room = None

    def _drop_unwanted(self) -> None:
        """Remove what ``DATA/ota`` holds of releases that are not to be staged (a kept release
        file counts against the disk budget), but the one ``staged.json`` hands to the root
        helper now."""
        ota = self.data_dir / OTA_DIR
        if ota.is_dir():
            drop_unwanted(ota, staged_version(self.data_dir), suffixes=KEPT_SUFFIXES)

    async def _stage(self, version: str, sha256: str) -> Staged:
        self._wait_for_room((version, sha256))
        assert self.settings.public_key is not None
        try:
            key = load_public_key(self.settings.public_key)
        except ModelError as err:
            raise ReleaseError(str(err)) from err
        fetcher = self._fetcher()
        before = report(self.settings.root).get("outcome")  # the helper's may follow the hand-over
        try:
            staged = await stage(
                fetcher,
                version=version,
                sha256=sha256,
                key=key,
                data_dir=self.data_dir,
                budget_bytes=self.settings.disk_budget,
                max_attempts=self.settings.max_attempts,
                health_window=self.settings.health_window,
                root=self.settings.root,
            )
        finally:
            await fetcher.close()
        self._said(_outcome(version, "staged", bytes=staged.manifest.size), before)
        return staged

    def _said(self, outcome: dict[str, Any], root_then: Any = ...) -> None:
        """``outcome`` is this process's; ``root_then`` the root's outcome it follows (read now
        when not given): :meth:`reported` shows the root's instead once that is another."""
        if root_then is ...:
            root_then = report(self.settings.root).get("outcome")
        self.outcome, self._root_then = outcome, root_then


def build_updates(agent: Any) -> UpdateController | None:
    """The runtime's controller: with ``[update]`` and an uplink (agent/service/runtime.py)."""
    from agent.sync.transport import CoapTransport

    settings = agent.config.update
    endpoints = agent.endpoints
    if settings is None or endpoints is None:
        return None

    def fetcher() -> ReleaseFetcher:
        transport = CoapTransport(
            agent.clock, lanes=BLOCK_WINDOW, uris=endpoints.uris, security=agent.security
        )
        return ReleaseFetcher(transport, lambda: endpoints.current)

    def acked() -> bool:
        uplink = agent.uplink
        return uplink is not None and uplink.stats.batches_acked > 0

    return UpdateController(settings, agent.config.agent.data_dir, fetcher, agent.clock, acked)
