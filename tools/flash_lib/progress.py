"""A one-line progress bar on stderr, drawn only when stderr is a terminal.

With a total it shows a bar, a percentage and the amount (bytes as MB); without one, a count of
items done. Redrawn at most ten times a second; ``done()`` ends the line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
REDRAW_EVERY = 0.1


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "bytes",
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.value = 0
        self._drawn = 0.0

    def _amount(self, n: int) -> str:
        return f"{n / 1e6:.1f} MB" if self.unit == "bytes" else f"{n} {self.unit}"

    def render(self) -> str:
        if self.total:
            frac = min(1.0, self.value / self.total)
            filled = int(frac * WIDTH)
            bar = "#" * filled + "-" * (WIDTH - filled)
            return (
                f"{self.label} [{bar}] {frac * 100:3.0f}% "
                f"{self._amount(self.value)}/{self._amount(self.total)}"
            )
        return f"{self.label} ... {self._amount(self.value)}"

    def advance(self, n: int = 1, note: str = "") -> None:
        self.value += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn >= REDRAW_EVERY or (self.total and self.value >= self.total):
            self._drawn = now
            line = self.render() + (f" {note}" if note else "")
            self.stream.write("\r\x1b[K" + line[:200])
            self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + self.render() + "\n")
            self.stream.flush()
