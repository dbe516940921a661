"""Interrupted model downloads kept for resuming, and what bounds them.

``partial/NAME@VERSION.part`` holds the blocks fetched so far (written in order; its length,
rounded down to whole blocks, is the progress); ``partial/NAME@VERSION.json`` beside it names the
file they belong to (name, version, SHA-256, size), so the blocks of another file are never
resumed. A pair is kept across restarts, and bounded:

- its bytes count against the cache's disk budget (:attr:`PartialFiles.used`);
- at open (:meth:`PartialFiles.sweep`) a pair is removed when its newest write is older than
  :data:`PARTIAL_MAX_AGE` (one written while the wall clock was not set yet, before
  :data:`drivers.clock.WALL_FLOOR`, has no age: it is kept), when its model is installed already,
  when one of the two files is missing or its name is not ``NAME@VERSION``, and any other file
  there is removed too;
- when a download of ``NAME`` starts, the partials of other versions of ``NAME`` are removed
  (that model's assignment moved on);
- a cache over its disk budget drops its partials (oldest first) before it evicts a model.

A partial a download is writing now (:attr:`PartialFiles.active`) is never removed. The methods
that touch files block: the cache runs them on its I/O thread (or at open).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from agent.detect.inference import ModelEntry, check_model_file
from agent.errors import ModelError, NotNow
from agent.files import fsync_dir, read_json, write_atomic
from agent.modelstore.signing import SignedManifest, check_name
from drivers.clock import WALL_FLOOR

#: Seconds after its last write that a kept partial download is removed at open (7 days: an
#: assignment not resumed for that long has most likely been replaced).
PARTIAL_MAX_AGE = 7 * 24 * 3600.0

Ref = tuple[str, str]  # (name, version)


def parse_name(filename: str) -> tuple[Ref, str] | None:
    """``(ref, suffix)`` of ``NAME@VERSION.part`` / ``.json``; None for any other name."""
    for suffix in (".part", ".json"):
        if filename.endswith(suffix):
            name, at, version = filename.removesuffix(suffix).partition("@")
            try:
                if at and check_name("name", name) and check_name("version", version):
                    return (name, version), suffix
            except ModelError:
                return None
    return None


def check_fits(manifest: SignedManifest, disk_budget: int, memory_budget: int) -> None:
    """Refuse, before a block is fetched, a model larger than the cache's disk or memory
    budget (it could never be kept or loaded)."""
    for tier, budget in (("disk", disk_budget), ("memory", memory_budget)):
        if manifest.size > budget:
            raise ModelError(
                f"model {manifest.name} {manifest.version}: {manifest.size} bytes, more than "
                f"the cache's {tier} budget of {budget} bytes ([models] {tier}_budget_mb); "
                "refused before download"
            )


class PartialFiles:
    """The ``partial/`` directory of a model cache. ``sizes``: bytes of each kept ``.part``,
    oldest first (as of the last look: a download in progress is counted when it stops)."""

    def __init__(self, directory: Path, *, readonly: bool = False) -> None:
        self.directory = Path(directory)
        self.readonly = readonly
        self.sizes: dict[Ref, int] = {}
        self.active: set[Ref] = set()  # downloads in progress: never removed

    def part(self, ref: Ref) -> Path:
        return self.directory / f"{ref[0]}@{ref[1]}.part"

    def meta(self, ref: Ref) -> Path:
        return self.directory / f"{ref[0]}@{ref[1]}.json"

    @property
    def used(self) -> int:
        return sum(self.sizes.values())

    def bytes(self, ref: Ref) -> int:
        """Bytes of the kept partial of ``ref`` on disk now (0: none)."""
        try:
            return self.part(ref).stat().st_size
        except OSError:
            return 0

    # -- at open ----------------------------------------------------------------------------------

    def sweep(self, installed: set[Ref], now: float, room: int) -> None:
        """Count the kept partials; remove (unless read-only) the stale, stray and needless
        ones (see the module docstring), and the oldest while they take more than ``room``."""
        self.sizes.clear()
        found: dict[Ref, dict[str, os.stat_result]] = {}
        stray: list[Path] = []
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return
        for p in entries:
            parsed = parse_name(p.name)
            try:
                st = p.lstat()
            except OSError:
                continue
            if parsed is None or not p.is_file() or p.is_symlink():
                stray.append(p)
                continue
            found.setdefault(parsed[0], {})[parsed[1]] = st
        kept: list[tuple[float, Ref, int]] = []
        for ref, stats in found.items():
            newest = max(st.st_mtime for st in stats.values())
            fresh = newest < WALL_FLOOR or now - newest <= PARTIAL_MAX_AGE  # no age before it
            if len(stats) == 2 and ref not in installed and fresh:
                kept.append((newest, ref, stats[".part"].st_size))
            else:
                stray.extend(self.directory / f"{ref[0]}@{ref[1]}{s}" for s in stats)
        for _, ref, size in sorted(kept):
            self.sizes[ref] = size
        while self.used > room and self.sizes:  # over the disk budget: the oldest go
            ref = next(iter(self.sizes))
            self.forget(ref)
            stray += [self.part(ref), self.meta(ref)]
        if not self.readonly:
            for p in stray:
                with contextlib.suppress(OSError):
                    p.unlink()

    # -- one download -----------------------------------------------------------------------------

    def same(self, ref: Ref, identity: dict[str, Any]) -> bool:
        """Whether the kept partial of ``ref`` belongs to the file ``identity`` names."""
        try:
            meta = read_json(self.meta(ref), limit=4096)  # a few fields
            return bool(meta == identity) and self.part(ref).is_file()
        except (OSError, ValueError):
            return False

    def prepare(self, manifest: SignedManifest, fresh: bool) -> None:
        """Keep the partial file if it holds blocks of ``manifest``'s file (and not ``fresh``),
        else start it over. NotNow when the free space cannot hold the rest or the partial
        cannot be written: the device's condition, not the model's (it fits the budgets, checked
        before), so the assignment is tried again later."""
        ref = (manifest.name, manifest.version)
        identity = {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.sha256,
            "size": manifest.size,
        }
        try:
            keep = not fresh and self.same(ref, identity)
            rest = manifest.size - (self.bytes(ref) if keep else 0)
            free = shutil.disk_usage(self.directory).free
            if rest > free:
                raise NotNow(
                    f"model {manifest.name} {manifest.version}: {rest} bytes to fetch, "
                    f"{free} bytes free in {self.directory}; waiting for free space"
                )
            if not keep:
                self.start(ref, identity)
        except OSError as err:
            raise NotNow(
                f"model {manifest.name} {manifest.version}: cannot write the partial download "
                f"in {self.directory} ({err})"
            ) from err

    def start(self, ref: Ref, identity: dict[str, Any]) -> None:
        """Start ``ref`` over: no blocks, the identity of the file to come."""
        with contextlib.suppress(OSError):
            self.part(ref).unlink()
        write_atomic(self.meta(ref), json.dumps(identity, sort_keys=True).encode("utf-8"))

    def install(
        self, manifest: SignedManifest, entry: ModelEntry, dest: Path, manifest_path: Path
    ) -> None:
        """Check the whole downloaded file (size, SHA-256 hashed in chunks, TFLite identifier)
        and install it atomically: the manifest first (an orphan manifest without its file is
        swept at open), then the file renamed to ``dest``, then its directory fsynced. A file
        that does not verify is deleted and refused (ModelError); a write that fails is NotNow."""
        ref = (manifest.name, manifest.version)
        part = self.part(ref)
        try:
            check_model_file(part, entry)
        except ModelError as err:
            self.remove(ref)
            raise ModelError(
                f"model {ref[0]} {ref[1]}: {str(err).removeprefix(str(part) + ': ')}"
                "; refused (tampered or corrupt in transit)"
            ) from None
        try:
            write_atomic(manifest_path, manifest.to_cbor())
            os.replace(part, dest)
            fsync_dir(dest.parent)
        except OSError as err:  # the device's disk, not the model: the verified file stays
            raise NotNow(f"model {ref[0]} {ref[1]}: cannot install ({err})") from err
        with contextlib.suppress(OSError):
            self.meta(ref).unlink()

    def remove(self, ref: Ref) -> None:
        """Delete the partial of ``ref`` (both files); see :meth:`forget` for the count."""
        if self.readonly:
            return
        for p in (self.part(ref), self.meta(ref)):
            with contextlib.suppress(OSError):
                p.unlink()

    # -- the count (on the event loop; the files change on the I/O thread) ----------------------

    def count(self, ref: Ref, size: int) -> None:
        """The partial of ``ref`` is kept with ``size`` bytes (0: none), as the newest."""
        self.sizes.pop(ref, None)
        if size:
            self.sizes[ref] = size

    def forget(self, ref: Ref) -> None:
        self.sizes.pop(ref, None)

    def others_of(self, ref: Ref) -> list[Ref]:
        """The kept partials of other versions of ``ref``'s model, not being written."""
        return [r for r in self.sizes if r[0] == ref[0] and r != ref and r not in self.active]

    def oldest_idle(self) -> Ref | None:
        """The oldest kept partial no download is writing (None: there is none)."""
        return next((r for r in self.sizes if r not in self.active), None)
