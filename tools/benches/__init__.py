"""Benchmark modules for tools/bench.py; each defines ``run(args) -> Result``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    metric: str
    value: str
    reference: str = ""


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: str, reference: str = "") -> None:
        self.rows.append(Row(metric, value, reference))
