"""How a device takes part in federated rounds: the ``[learn]`` table (docs/learning.md)."""

from __future__ import annotations

from dataclasses import dataclass

from drivers.base import Options

DEFAULT_WINDOWS = 2048  # normal windows kept in memory (32 floats each: 256 KiB)
DEFAULT_MIN_WINDOWS = 64
DEFAULT_MEMORY_MB = 384  # address space of the training process (numpy + one model)
DEFAULT_MAX_LAG_MS = 50.0  # the agent's event loop late by more than this: training pauses
DEFAULT_EPSILON_BUDGET = 200.0  # the device's privacy budget over all jobs (agent/learn/ledger.py)
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class LearnSettings:
    enabled: bool = True
    windows: int = DEFAULT_WINDOWS
    min_windows: int = DEFAULT_MIN_WINDOWS
    memory_mb: int = DEFAULT_MEMORY_MB
    max_lag_ms: float = DEFAULT_MAX_LAG_MS
    epsilon_budget: float = DEFAULT_EPSILON_BUDGET
    delta: float = DEFAULT_DELTA

    @classmethod
    def from_options(cls, opts: Options) -> LearnSettings:
        """Validate the ``[learn]`` table (errors name the key) and call ``opts.finish()``."""
        enabled = opts.boolean("enabled", True)
        windows = opts.integer("windows", DEFAULT_WINDOWS, minimum=16, maximum=65536)
        least = opts.integer("min_windows", DEFAULT_MIN_WINDOWS, minimum=1, maximum=65536)
        if least > windows:
            raise opts.error("min_windows", f"{least} is above windows ({windows})")
        memory = opts.integer("memory_mb", DEFAULT_MEMORY_MB, minimum=128, maximum=65536)
        lag = opts.number("max_lag_ms", DEFAULT_MAX_LAG_MS, minimum=1.0, maximum=10_000.0)
        budget = opts.number(
            "epsilon_budget", DEFAULT_EPSILON_BUDGET, minimum=0.01, maximum=1_000_000.0
        )
        delta = opts.number("delta", DEFAULT_DELTA, minimum=1e-12, maximum=0.1)
        opts.finish()
        return cls(enabled, windows, least, memory, lag, budget, delta)
