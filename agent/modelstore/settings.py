"""How the model cache is configured: :class:`ModelsSettings`, the ``[models]`` table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.errors import ModelError
from agent.files import MAX_BUDGET_MB, config_path_exists, resolve_path
from agent.modelstore.signing import NAME_RE, load_public_key
from drivers.base import Options

DEFAULT_MEMORY_BUDGET_MB = 16.0
DEFAULT_DISK_BUDGET_MB = 64.0


@dataclass(frozen=True)
class ModelsSettings:
    """The ``[models]`` table: where the cache lives, its budgets, the key, the resource path."""

    cache_dir: Path = Path("/var/lib/edge-agent/models")
    memory_budget: int = int(DEFAULT_MEMORY_BUDGET_MB * 1024 * 1024)
    disk_budget: int = int(DEFAULT_DISK_BUDGET_MB * 1024 * 1024)
    public_key: Path | None = None  # without it, downloads are refused
    endpoint_path: str = "models"

    @classmethod
    def from_options(
        cls, opts: Options, data_dir: Path, base_dir: Path | None = None
    ) -> ModelsSettings:
        """Validate a ``[models]`` table (errors name the key) and call ``opts.finish()``.

        Keys: ``cache_dir`` (default ``models`` under ``data_dir``), ``memory_budget_mb`` (16),
        ``disk_budget_mb`` (64), ``public_key`` (a path, relative to the config file's
        directory; PEM, raw 32 bytes or 64 hex digits: checked when it exists; a key not there
        yet refuses downloads until it is), ``endpoint_path`` ("models")."""
        raw = opts.string("cache_dir", "models")
        if not raw.strip():
            raise opts.error("cache_dir", "is empty")
        cache_dir = resolve_path(Path(data_dir), raw)
        memory = opts.number(
            "memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB, above=0.0, maximum=MAX_BUDGET_MB
        )
        disk = opts.number(
            "disk_budget_mb", DEFAULT_DISK_BUDGET_MB, above=0.0, maximum=MAX_BUDGET_MB
        )
        public_key = None
        if opts.has("public_key"):
            key = Path(opts.string("public_key")).expanduser()
            if base_dir is not None and not key.is_absolute():
                key = base_dir / key
            # a key not there yet: downloads are refused until it is
            if config_path_exists(opts, "public_key", key):
                if not key.is_file():
                    raise opts.error("public_key", f"{key} is not a file")
                try:
                    load_public_key(key)
                except ModelError as err:
                    raise opts.error("public_key", str(err)) from None
            public_key = key
        path = opts.string("endpoint_path", "models").strip("/")
        if not path or not all(NAME_RE.match(seg) for seg in path.split("/")):
            raise opts.error("endpoint_path", f"{path!r} is not a resource path like 'models'")
        opts.finish()
        return cls(
            cache_dir=cache_dir,
            memory_budget=int(memory * 1024 * 1024),
            disk_budget=int(disk * 1024 * 1024),
            public_key=public_key,
            endpoint_path=path,
        )
