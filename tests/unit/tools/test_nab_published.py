"""tools/nab_published.py: the notebooks' rule for changepoints, and a pickle that tries to run
code is refused (the pickles come from a public repository)."""

from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))

import nab_published as npub  # noqa: E402


def test_changepoints_where_the_label_changes_and_at_a_first_row_of_1() -> None:
    labels = np.array([1, 1, 0, 0, 1, 1, 1, 0], dtype=float)
    # |diff| with a 0 before the first row: 1 0 1 0 1 0 0 1
    assert npub.changepoints_of(labels).tolist() == [
        True, False, True, False, True, False, False, True
    ]  # fmt: skip


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_attack_a_pickle_that_calls_os_system_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results-Evil.pkl"
    path.write_bytes(pickle.dumps([_Evil()]))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        npub.load_predictions(path)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        npub._Unpickler(io.BytesIO(pickle.dumps(eval))).load()
