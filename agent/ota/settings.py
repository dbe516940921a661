"""How agent updates are configured: :class:`UpdateSettings`, the ``[update]`` table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelError
from agent.files import MAX_BUDGET_MB, config_path_exists, resolve_path
from agent.modelstore.signing import load_public_key
from agent.ota.bootcheck import (
    HEALTH_WINDOW,
    MAX_ATTEMPTS,
    MAX_ATTEMPTS_LIMIT,
    MAX_HEALTH_WINDOW,
    MIN_HEALTH_WINDOW,
)
from drivers.base import Options

DEFAULT_ROOT = "/opt/edge-agent"
DEFAULT_DISK_BUDGET_MB = 512.0


@dataclass(frozen=True)
class UpdateSettings:
    """The ``[update]`` table: the release root, the release key, the download budget."""

    root: Path = Path(DEFAULT_ROOT)
    public_key: Path | None = None  # without it, every release is refused
    disk_budget: int = int(DEFAULT_DISK_BUDGET_MB * 1024 * 1024)
    max_attempts: int = MAX_ATTEMPTS
    health_window: int = HEALTH_WINDOW

    @classmethod
    def from_options(cls, opts: Options, base_dir: Path | None = None) -> UpdateSettings:
        """Validate an ``[update]`` table (errors name the key) and call ``opts.finish()``.

        Keys: ``root`` (/opt/edge-agent: releases/, current, previous, update.json),
        ``public_key`` (the release key's public half, relative to the config file; checked
        when it exists), ``disk_budget_mb`` (512: a downloaded release may take this much of the
        data directory), ``max_attempts`` (3: starts of a new release before it is rolled back),
        ``health_window_s`` (600: seconds a new release that runs has to confirm, i.e. READY and
        a sync exchange, before edge-agent-health.timer rolls it back; 60 to 86400). The root
        helper takes the last two from the staged release (agent/ota/updater.py).
        """
        base = base_dir or Path.cwd()
        root = resolve_path(base, opts.string("root", DEFAULT_ROOT))
        public_key = None
        if opts.has("public_key"):
            key = resolve_path(base, opts.string("public_key"))
            if config_path_exists(opts, "public_key", key):
                try:
                    load_public_key(key)
                except ModelError as err:
                    raise opts.error("public_key", str(err)) from None
            public_key = key
        disk = opts.number(
            "disk_budget_mb", DEFAULT_DISK_BUDGET_MB, above=0.0, maximum=MAX_BUDGET_MB
        )
        attempts = opts.integer("max_attempts", MAX_ATTEMPTS, minimum=1, maximum=MAX_ATTEMPTS_LIMIT)
        window = opts.integer(
            "health_window_s", HEALTH_WINDOW, minimum=MIN_HEALTH_WINDOW, maximum=MAX_HEALTH_WINDOW
        )
        opts.finish()
        return cls(
            root=root,
            public_key=public_key,
            disk_budget=int(disk * 1024 * 1024),
            max_attempts=attempts,
            health_window=window,
        )
