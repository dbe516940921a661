"""The agent's data directory before anything starts: created if missing, checked writable by
this user (``run`` and ``demo --data-dir``), so that a directory the agent cannot use is one line
naming it and the fix (exit 77 or 73) rather than a traceback from deep in the store."""

from __future__ import annotations

import os
import pwd

from agent.exits import CommandError, os_error_code, os_error_line
from agent.files import ensure_writable_dir
from agent.service.config import Config


def prepare_data_dir(cfg: Config) -> None:
    """Create the data directory (and the store's) and check that this user can write there:
    CommandError (one line with the fix) when not."""
    for d in dict.fromkeys((cfg.agent.data_dir, cfg.store.path.parent)):
        try:
            ensure_writable_dir(d)
        except OSError as err:
            user = user_name()
            how = (
                f"make it writable for user {user} (sudo chown {user} {d})"
                if d.is_dir()
                else f"create it for user {user} (sudo install -d -o {user} {d})"
            )
            fix = f"{how}, or choose another: --data-dir DIR or [agent] data_dir in {cfg.path}"
            raise CommandError(
                os_error_code(err), "edge-agent: " + os_error_line(err, "data directory", fix)
            ) from None


def user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
