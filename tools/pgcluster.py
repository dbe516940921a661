"""A private PostgreSQL cluster for tests and benches: ``initdb`` into a directory, ``pg_ctl
start``, one database, ``pg_ctl stop -m fast`` and the directory is gone.

    python tools/pgcluster.py start DIR    # prints the DSN; the cluster keeps running
    python tools/pgcluster.py dsn DIR      # prints it again
    python tools/pgcluster.py stop DIR     # stops it and removes DIR

or, from Python, ``with Cluster() as cluster: cluster.dsn()``.

- The binaries are Debian's (``/usr/lib/postgresql/<major>/bin``, the newest major), or those in
  ``$EDGE_AGENT_PG_BIN``, or ``initdb`` on the PATH. Missing: :class:`ClusterUnavailable`.
- ``initdb`` refuses to run as root. As root the cluster runs as the ``postgres`` system user that
  Debian's package creates (``runuser -u postgres --``), and the directory is handed to it;
  as anybody else it runs as that user.
- It listens on a unix socket in the directory (trust: only who can enter the directory, mode
  0700, can connect) and on 127.0.0.1 on a free port (scram-sha-256 with a random password, which
  the DSN carries).
- Settings: ``fsync=on``, ``synchronous_commit=on`` and ``full_page_writes=on``: a commit is on
  disk when it returns, as in production, so what the tests and benches measure is the real
  price of durability (the endpoint acknowledges a record only when it is durable; a bench on an
  unsynced cluster would flatter PostgreSQL against SQLite's ``synchronous=FULL``).
  ``wal_level=minimal`` (no replica to feed), ``shared_buffers=64MB`` and ``max_connections=200``
  (several endpoint processes, each with a pool, share one test cluster), logging of warnings
  only, to ``DIR/postgresql.log``.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from ports import free_port  # tools/ is on sys.path: as a script, and in tests (conftest)

PG_USER = "postgres"  # the system user Debian's package creates; used when running as root
SUPERUSER = "edge"  # the cluster's superuser (initdb -U)
DATABASE = "edge"
START_TIMEOUT = 60  # seconds for pg_ctl start -w
STOP_TIMEOUT = 60
SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "shared_buffers": "64MB",
    "max_connections": "200",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # the tests provoke errors on purpose
    "logging_collector": "off",
    "listen_addresses": "'127.0.0.1'",
}


class ClusterUnavailable(RuntimeError):
    """PostgreSQL cannot run here (not installed, no ``postgres`` user, initdb failed)."""


def find_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl`` (module docstring)."""
    env = os.environ.get("EDGE_AGENT_PG_BIN")
    candidates = [Path(env)] if env else []
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
        reverse=True,
    )
    candidates += found
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise ClusterUnavailable(
        "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on the PATH): "
        "apt-get install postgresql, or set EDGE_AGENT_PG_BIN"
    )


class Cluster:
    """A PostgreSQL cluster in ``directory`` (a new temporary one when None)."""

    def __init__(
        self,
        directory: str | Path | None = None,
        port: int | None = None,
        listen: tuple[str, ...] = (),
        clients: tuple[str, ...] = (),
    ) -> None:
        """``listen``: addresses to listen on besides 127.0.0.1; ``clients``: networks (CIDR)
        allowed to connect over TCP besides loopback (with the password)."""
        self.listen = listen
        self.clients = clients
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self._owner = pwd.getpwnam(PG_USER)
            except KeyError as err:
                raise ClusterUnavailable(
                    f"running as root and there is no {PG_USER!r} user to run PostgreSQL as "
                    "(Debian's postgresql package creates it)"
                ) from err
        else:
            self._owner = pwd.getpwuid(os.geteuid())
        self._made_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.port = port or 0
        self.password = ""

    # -- paths -----------------------------------------------------------------------------------

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def log_file(self) -> Path:
        return self.dir / "postgresql.log"

    @property
    def dsn_file(self) -> Path:
        return self.dir / "dsn"

    def dsn(self, database: str = DATABASE, host: str = "127.0.0.1") -> str:
        """``postgresql://`` URL of ``database`` over TCP on ``host`` (with the password)."""
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{host}:{self.port}/"
            f"{quote(database, safe='')}"
        )

    # -- running ---------------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 120) -> str:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        try:
            done = subprocess.run(
                cmd,
                cwd=self.dir,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env={**os.environ, "LC_ALL": "C.UTF-8", "PGTZ": "UTC"},
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ClusterUnavailable(f"{Path(cmd[0]).name} failed: {err}") from err
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ClusterUnavailable(
                f"{Path(args[0]).name} exited with {done.returncode}: " + " | ".join(tail)
            )
        return done.stdout

    def _prepare_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if any(self.dir.iterdir()):
            raise ClusterUnavailable(f"{self.dir} is not empty (a cluster there already?)")
        os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)
        self.dir.chmod(0o700)
        # the owner must reach the directory: every parent must be searchable by it
        probe = ["test", "-w", str(self.dir)]
        if self.as_root and subprocess.run(["runuser", "-u", PG_USER, "--", *probe]).returncode:
            raise ClusterUnavailable(
                f"user {PG_USER!r} cannot enter {self.dir} (a parent directory is closed to it): "
                "use a directory under /tmp"
            )

    def start(self) -> Cluster:
        """initdb, start, create the database; the DSN is then :meth:`dsn` (and in DIR/dsn)."""
        self._prepare_dir()
        try:
            self.port = self.port or free_port()
            self.password = secrets.token_urlsafe(18)
            pwfile = self.dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            os.chown(pwfile, self._owner.pw_uid, self._owner.pw_gid)
            pwfile.chmod(0o600)
            self._run(
                self.bindir / "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-instructions",
            )
            pwfile.unlink()
            settings = {
                **SETTINGS,
                "port": str(self.port),
                "unix_socket_directories": f"'{self.dir}'",
                "listen_addresses": "'" + ",".join(("127.0.0.1", *self.listen)) + "'",
            }
            if self.clients:
                with open(self.data / "pg_hba.conf", "a", encoding="utf-8") as hba:
                    hba.writelines(f"host all all {net} scram-sha-256\n" for net in self.clients)
            with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write("\n# tools/pgcluster.py\n")
                conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
            self._run(
                self.bindir / "pg_ctl",
                "start",
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-D",
                str(self.data),
                "-l",
                str(self.log_file),
                timeout=START_TIMEOUT + 10,
            )
            self._run(
                self.bindir / "createdb",
                "-h",
                str(self.dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                DATABASE,
            )
            self.dsn_file.write_text(self.dsn() + "\n")
            self.dsn_file.chmod(0o600)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast: sessions are ended) and remove the directory."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(
                    self.bindir / "pg_ctl",
                    "stop",
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(STOP_TIMEOUT),
                    "-D",
                    str(self.data),
                    timeout=STOP_TIMEOUT + 10,
                )
            except ClusterUnavailable as err:
                print(f"pgcluster: stop: {err}", file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)

    @classmethod
    def existing(cls, directory: str | Path) -> Cluster:
        """The cluster that ``start`` left running in ``directory``."""
        cluster = cls(directory)
        try:
            url = cluster.dsn_file.read_text().strip()
        except OSError as err:
            raise ClusterUnavailable(f"no cluster in {directory}: {err}") from err
        match = re.match(r"postgresql://[^:]+:([^@]*)@127\.0\.0\.1:(\d+)/", url)
        if match:
            cluster.password, cluster.port = match.group(1), int(match.group(2))
        return cluster

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "dsn"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            print(Cluster(args.dir.resolve(), args.port).start().dsn())
        elif args.command == "dsn":
            print(Cluster.existing(args.dir.resolve()).dsn_file.read_text().strip())
        else:
            Cluster.existing(args.dir.resolve()).stop()
    except ClusterUnavailable as err:
        print(f"pgcluster: {err}", file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
