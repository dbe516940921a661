"""powercut: a FUSE filesystem that loses, at a simulated power cut, everything that was not made
durable, as the LazyFS work does it, so the agent's store, model cache and state files can be
tested against real power-loss semantics.

Use it from tests (the filesystem runs in its own process; ``cut`` needs no cooperation from the
processes using it)::

    from tools.powercut import PowerCutFS

    with PowerCutFS(backing_dir) as fs:
        child = start_writer(fs.mountpoint)
        ...
        fs.stats()                  # Stats(pending_bytes=..., fsyncs=..., journal_ops=...)
        fs.cut(kill=[child.pid])    # freeze, SIGKILL, lose the unsynced state, remount
        check(fs.mountpoint)        # the view is now exactly what was durable

or by hand: ``python -m tools.powercut MOUNTPOINT BACKING`` (``kill -USR1`` cuts, see
:mod:`.__main__`). It needs /dev/fuse, libfuse 3 and fusermount3 (Debian's ``fuse3``) and the
``mfusepy`` binding.

What is modelled
- A passthrough over a backing directory. The backing directory is the disk: after a cut the
  mount shows it as it is.
- File data (write, and truncate or O_TRUNC, which change the size) that was not followed by an
  fsync or fdatasync of that file is held in memory, per inode, in whole 4 KiB pages; every handle
  of the file reads it, as the page cache would serve it. fsync/fdatasync of a file (through any of
  its handles) writes that file's pending pages and size to the backing file and fsyncs it there.
  close() makes nothing durable. Shared writable mmap works (no direct_io): the kernel writes dirty
  mapped pages back as ordinary writes, so they are pending like any other, and SQLite's WAL index
  (``-shm``) works unchanged, POSIX and flock locks included (the kernel keeps them locally).
- Namespace operations (create, mkdir, mknod, symlink, link, unlink, rmdir, rename) are applied at
  once but are durable only after an fsync of a directory they touched: the filesystem keeps an
  ordered journal of them, as a journalling filesystem does, and an fsync of a directory makes
  durable every operation up to the last one that touched that directory (including earlier ones
  elsewhere). At a cut the rest is undone, newest first, so the namespace is exactly as it was at
  that point (a removed or replaced file is kept in a hidden trash until its removal is durable).
  An fsync of a file does not make its own directory entry durable (POSIX asks for the directory's
  fsync; ext4 would be kinder). So a new file that was fsynced but whose directory was not
  disappears at a cut, and a rename over an old file without a directory fsync brings the old
  file back.
- A cut freezes the filesystem first (it holds the lock every operation takes, so no operation
  completes after it), SIGKILLs the given pids while frozen, drops every pending page and undoes
  the un-synced namespace operations, detaches the mount and exits (which aborts the FUSE
  connection, so requests still waiting fail and killed processes blocked in them die), and
  mounts the backing directory afresh.
- Optionally (``cut(torn=(seed, fraction))``) the cut is less kind, as real disks are: a random
  prefix of the un-synced namespace operations survives, and a random part of the dirty pages
  that overwrite durable data reach the disk (torn, unordered overwrites within a file).

What is not modelled
- chmod, chown and utimens are passed through and durable at once; so are xattrs (not
  supported: ENOTSUP) and atime. mtime of a file with pending data is kept in memory.
- Torn writes within a 4 KiB page, reordering of durable writes across files, lying disks (an
  fsync that does not persist) and extending writes persisting without an fsync are not
  modelled; RENAME_EXCHANGE is refused (EINVAL).
- If the filesystem process itself dies without a cut or a clean close, the backing directory
  keeps the namespace as it was live (with durable data only) and the next mount deletes the
  trash.
- sync(2) and syncfs(2) make nothing durable here (the kernel does not pass them on to a FUSE
  filesystem); :meth:`PowerCutFS.sync` does what they would.
- A full disk shows at the fsync that writes pending data out, never at write() (ext4 reserves
  space at write time).
- No permission checks beyond the backing filesystem's: it is a test tool, run as root.

Counters (:meth:`PowerCutFS.stats`): pending files and bytes (whole pages), un-synced namespace
operations, open handles, writes, fsyncs, fdatasyncs and directory fsyncs since the last mount.
"""

from __future__ import annotations

from .client import PowerCutError, PowerCutFS, Stats

__all__ = ["PowerCutError", "PowerCutFS", "Stats"]
