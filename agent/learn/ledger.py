"""A device's privacy budget across every federated job (docs/learning.md "Privacy").

Each round a device uploads is a Gaussian mechanism with the noise multiplier the endpoint's task
names; rounds compose by Renyi DP whatever job they belong to, so the device keeps one ledger
for its lifetime: the composed RDP at each order of :data:`agent.learn.privacy.ORDERS` and the
rounds already charged, in ``DATA/learn-privacy.json``. Before a round is trained, the device
checks that charging it keeps its (epsilon, ``[learn] delta``) guarantee within ``[learn]
epsilon_budget``; a round that would not (including one asking for no noise at all) is refused
and never trained. The charge is written durably *before* the first byte of the update leaves,
once per (job, round): sending the same noisy update again costs nothing more (it is the same
output), a round charged and then never delivered stays charged (the safe side).

Rounds that only check (the endpoint's check of a round's model, docs/learning.md "The check")
release no weights and are not charged, but their upload, like a training round's, holds a score
summary and two fractions of a model the endpoint chose, on the device's newest windows, without
noise: so that an endpoint cannot ask for those without limit, a device answers at most as many
such rounds as it has rounds charged (:meth:`PrivacyLedger.check_only`), and records each
durably before its upload leaves, in the same file.

A ledger that cannot be read (corrupt, foreign) spends the whole budget: the device cannot know
what it already released, so it takes part in no round until an operator removes the file
(docs/learning.md says so).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.files import read_json, write_atomic
from agent.learn.privacy import ORDERS, gaussian_rdp, rdp_to_epsilon

LEDGER_FILE = "learn-privacy.json"
MAX_CHARGED = 10_000  # (job, round) keys kept to recognise a round charged before


class BudgetExceeded(Exception):
    """Charging a round would take the device past its privacy budget; the message says how."""


class PrivacyLedger:
    """The device's spent privacy (module docstring)."""

    def __init__(self, path: Path, budget: float, delta: float) -> None:
        self.path = Path(path)
        self.budget = float(budget)
        self.delta = float(delta)
        self.orders = np.asarray(ORDERS, dtype=np.float64)
        self.rdp = np.zeros_like(self.orders)
        self.charged: list[str] = []
        self.checked: list[str] = []  # rounds that only checked, answered
        self.unreadable: str | None = None
        self._lock = threading.Lock()  # rounds of several models charge from worker threads
        self._load()

    def _load(self) -> None:
        try:
            doc = read_json(self.path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            self.unreadable = f"{self.path}: {err}"
            return
        rdp = doc.get("rdp") if isinstance(doc, dict) else None
        charged = doc.get("charged") if isinstance(doc, dict) else None
        checked = doc.get("checked", []) if isinstance(doc, dict) else None  # absent: none yet
        if (
            not isinstance(rdp, list)
            or len(rdp) != len(self.orders)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rdp)
            or not all(x >= 0 for x in rdp)
            or not isinstance(charged, list)
            or not all(isinstance(k, str) for k in charged)
            or not isinstance(checked, list)
            or not all(isinstance(k, str) for k in checked)
        ):
            self.unreadable = f"{self.path}: not a privacy ledger of this agent"
            return
        self.rdp = np.asarray(rdp, dtype=np.float64)  # inf (a noiseless round) is kept as inf
        self.charged = charged[-MAX_CHARGED:]
        self.checked = checked[-MAX_CHARGED:]

    @staticmethod
    def key(job: int, round_: int) -> str:
        return f"{job}:{round_}"

    def spent(self) -> float:
        """The (epsilon, delta) guarantee of everything charged so far (inf when unreadable)."""
        if self.unreadable is not None:
            return math.inf
        if not self.charged:
            return 0.0
        return _epsilon(self.orders, self.rdp, self.delta)

    def after(self, noise: float) -> float:
        """Epsilon once one more round with noise multiplier ``noise`` is charged."""
        if self.unreadable is not None:
            return math.inf
        return _epsilon(self.orders, self.rdp + _round_rdp(self.orders, noise), self.delta)

    def check(self, job: int, round_: int, noise: float) -> None:
        """BudgetExceeded unless the round is charged already or fits the budget."""
        if self.unreadable is not None:
            raise BudgetExceeded(
                f"privacy ledger unreadable ({self.unreadable}): no round until it is removed"
            )
        if self.key(job, round_) in self.charged:
            return
        eps = self.after(noise)
        if not eps <= self.budget:
            what = "no noise" if noise <= 0 else f"noise {noise:g}"
            raise BudgetExceeded(
                f"privacy budget: this round ({what}) would bring epsilon to {eps:.3g}, "
                f"above [learn] epsilon_budget {self.budget:g} (spent {self.spent():.3g})"
            )

    def charge(self, job: int, round_: int, noise: float) -> None:
        """Record the round durably (once); BudgetExceeded when it does not fit. Charges are
        serialized: two rounds charged at once from two threads each add their own (neither is
        lost by a read-modify-write race)."""
        with self._lock:
            self.check(job, round_, noise)
            key = self.key(job, round_)
            if key in self.charged:
                return
            rdp = self.rdp + _round_rdp(self.orders, noise)
            charged = [*self.charged, key][-MAX_CHARGED:]
            self._write(rdp, charged, self.checked)  # OSError: not charged
            self.rdp, self.charged = rdp, charged

    def check_only(self, job: int, round_: int, record: bool = False) -> None:
        """BudgetExceeded unless the device may answer this round that only checks: answered
        already, or fewer answered than rounds charged (module docstring). ``record``: write it
        durably (OSError: not recorded), before its upload leaves."""
        with self._lock:
            if self.unreadable is not None:
                raise BudgetExceeded(
                    f"privacy ledger unreadable ({self.unreadable}): no round until it is removed"
                )
            key = self.key(job, round_)
            if key in self.checked:
                return
            if len(self.checked) >= len(self.charged):
                raise BudgetExceeded(
                    f"rounds that only check: {len(self.checked)} answered, as many as the "
                    f"{len(self.charged)} rounds this device trained (each upload holds a score "
                    "summary without noise)"
                )
            if record:
                checked = [*self.checked, key][-MAX_CHARGED:]
                self._write(self.rdp, self.charged, checked)
                self.checked = checked

    def _write(self, rdp: np.ndarray, charged: list[str], checked: list[str]) -> None:
        doc: dict[str, Any] = {"rdp": [float(x) for x in rdp], "charged": charged}
        if checked:
            doc["checked"] = checked
        write_atomic(self.path, json.dumps(doc).encode(), mode=0o600)


def _round_rdp(orders: np.ndarray, noise: float) -> np.ndarray:
    if noise <= 0:
        return np.full_like(orders, math.inf)
    return gaussian_rdp(orders, noise)


def _epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    if not np.all(np.isfinite(rdp)):
        return math.inf
    return rdp_to_epsilon(orders, rdp, delta)[0]
