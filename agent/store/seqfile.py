"""The sequence side file (``queue.db.seq``): the reservation above which no sequence number has
been issued, kept outside the database so it survives the database's loss.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from agent.files import fsync_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeqMark:
    reserved: int  # no sequence number above this has been issued
    mode: str  # durability of the session that wrote it


class SeqFile:
    """``queue.db.seq``: one line, replaced atomically (write, fsync, rename, fsync dir).

    Every issued sequence number is <= ``reserved``: before a transaction commits a number above
    it (a put, or a renumbering into a new epoch), the file is rewritten with
    ``reserved = hwm + SEQ_BLOCK``. So when the database is lost or
    corrupt, a new one starts above ``reserved`` and never reissues a number. It is also the
    answer to power loss with ``synchronous=NORMAL``: commits may roll back, so a session after a
    NORMAL one starts above ``reserved`` rather than at the database's own high-water mark.
    """

    MAGIC = "edge-agent-seq 1"

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> SeqMark | None:
        try:
            text = self.path.read_text("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            log.warning("event=seqfile_unreadable path=%s error=%s", self.path, err)
            return None
        try:
            head, crc = text.rsplit(" crc=", 1)
            if f"{zlib.crc32(head.encode()):08x}" != crc:
                raise ValueError("checksum mismatch")
            magic, rest = head[: len(self.MAGIC)], head[len(self.MAGIC) :].split()
            if magic != self.MAGIC:
                raise ValueError("bad magic")
            fields = dict(item.split("=", 1) for item in rest)
            mark = SeqMark(reserved=int(fields["reserved"]), mode=fields["mode"])
            if mark.reserved < 0 or mark.mode not in ("full", "normal"):
                raise ValueError("bad values")
            return mark
        except (ValueError, KeyError) as err:
            log.warning("event=seqfile_invalid path=%s error=%s", self.path, err)
            return None

    def write(self, mark: SeqMark) -> None:
        head = f"{self.MAGIC} reserved={mark.reserved} mode={mark.mode}"
        data = f"{head} crc={zlib.crc32(head.encode()):08x}\n".encode("ascii")
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
