"""Exit codes of the command lines (``edge-agent``, ``edge-agent-cloud``) and the one-line message
for an operating-system error.

The codes are BSD's sysexits.h, which systemd and shell scripts understand: 64 a bad command
line, 65 bad data, 66 a missing input file, 69 a service that does not answer, 70 a bug, 73 a file
that cannot be created, 74 an I/O error, 75 a temporary failure (try again), 77 no permission,
78 a bad configuration. 1 is a check that failed (``selftest``: a required sensor), 141 a reader
that went away (128 + SIGPIPE, as a shell reports a pipeline cut short by ``head``).

Every error a command meets is printed as one line naming the thing and what to do next
(:func:`os_error_line`); nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

EX_OK = 0
EX_FAIL = 1  # a check failed (selftest)
EX_USAGE = 64  # the command line is wrong
EX_DATAERR = 65  # input data is wrong (a corrupt file)
EX_NOINPUT = 66  # an input file does not exist or cannot be read
EX_UNAVAILABLE = 69  # a service does not answer (no agent running, an address not on this host)
EX_SOFTWARE = 70  # a bug: please report it
EX_CANTCREAT = 73  # an output file or directory cannot be created
EX_IOERR = 74  # an I/O error (disk full, device error)
EX_TEMPFAIL = 75  # try again later (an address in use, a lock held by another process)
EX_NOPERM = 77  # permission denied
EX_CONFIG = 78  # the configuration is wrong
EX_SIGPIPE = 141  # 128 + SIGPIPE: the reader of standard output went away


class CommandError(Exception):
    """A command cannot go on: ``str(err)`` is its one line for stderr, ``code`` its exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class UsageParser(argparse.ArgumentParser):
    """argparse with a usage error as one line and exit 64 (argparse's own: the usage, the error
    and exit 2). Its subcommands' parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EX_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


#: errno -> (exit code, what it means, in words)
_ERRNO: dict[int, tuple[int, str]] = {
    errno.EACCES: (EX_NOPERM, "permission denied"),
    errno.EPERM: (EX_NOPERM, "operation not permitted"),
    errno.EROFS: (EX_CANTCREAT, "read-only file system"),
    errno.ENOENT: (EX_NOINPUT, "no such file or directory"),
    errno.ENOTDIR: (EX_CANTCREAT, "a part of the path is not a directory"),
    errno.EISDIR: (EX_CANTCREAT, "is a directory"),
    errno.EEXIST: (EX_CANTCREAT, "already exists"),
    errno.ENOSPC: (EX_IOERR, "no space left on the device"),
    errno.EDQUOT: (EX_IOERR, "disk quota exceeded"),
    errno.EIO: (EX_IOERR, "input/output error"),
    errno.EADDRINUSE: (EX_TEMPFAIL, "in use by another process"),
    errno.EADDRNOTAVAIL: (EX_UNAVAILABLE, "not an address of this host"),
    errno.EAGAIN: (EX_TEMPFAIL, "temporarily unavailable"),
    errno.ECONNREFUSED: (EX_UNAVAILABLE, "connection refused"),
    errno.ENAMETOOLONG: (EX_USAGE, "name too long"),
}
_ADVICE: dict[int, str] = {
    EX_NOPERM: "run as a user that may write it, or change its owner (chown) or mode",
    EX_CANTCREAT: "choose a writable directory",
    EX_NOINPUT: "check the path",
    EX_IOERR: "free space on the disk or check the device",
}


def os_error_code(err: OSError) -> int:
    """The exit code for ``err`` (74, an I/O error, when its errno is not in the table)."""
    return _ERRNO.get(err.errno or 0, (EX_IOERR, ""))[0]


def os_error_line(err: OSError, what: str = "", fix: str = "") -> str:
    """``WHAT PATH: meaning (strerror); fix`` in one line: the thing, the reason, what to do."""
    code, meaning = _ERRNO.get(err.errno or 0, (EX_IOERR, ""))
    path = err.filename if err.filename is not None else ""
    name = " ".join(str(p) for p in (what, path) if p) or "the operating system"
    reason = meaning or (err.strerror or str(err)).lower()
    fix = fix or _ADVICE.get(code, "")
    return f"{name}: {reason}" + (f"; {fix}" if fix else "")


def stdout_closed() -> int:
    """Standard output's reader went away (``... | head``): point the descriptor at /dev/null, so
    that the interpreter's last flush at exit cannot fail too, and return :data:`EX_SIGPIPE`."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EX_SIGPIPE
