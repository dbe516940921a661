"""tools/evaluate.py --plot: one PNG per SKAB file, valid, of a sensible size and not blank.

Runs on small synthetic files in SKAB's format written here, so it never needs ../shared.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools"))

import evaluate as ev  # noqa: E402

from tests.unit.tools.test_evaluate import synthetic, write_csv  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (which must come first)."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    rows, labels = synthetic(700, 1, (500, 620))
    write_csv(folder / "valve9" / "1.csv", rows, labels)
    rows, _ = synthetic(520, 3, (450, 500))
    write_csv(folder / "nolabels" / "3.csv", rows)  # no label columns: predicted spans only
    (folder / "notes.csv").write_text("something;else\n1;2\n")  # not SKAB: skipped, no plot
    return folder


def test_plot_writes_one_png_per_skab_file(data: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "TkAgg")  # an interactive backend must not be needed
    out = tmp_path / "plots"
    assert ev.main(["--data", str(data), "--plot", str(out)]) == 0
    assert "2 plots written under" in capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written == ["nolabels", "nolabels/3.png", "valve9", "valve9/1.png"]

    import matplotlib.image

    for rel in ("valve9/1.png", "nolabels/3.png"):
        path = out / rel
        raw = path.read_bytes()
        width, height = png_size(raw)
        assert width == ev.PLOT_WIDTH * ev.PLOT_DPI
        assert 600 <= height <= 2000, (width, height)
        assert len(raw) > 20_000  # eight channels of noise and a score line, not an empty frame
        pixels = matplotlib.image.imread(path)  # decodes the whole file: it is a valid PNG
        assert pixels.shape[:2] == (height, width)
        grey = pixels[..., :3].mean(axis=2)
        assert grey.std() > 0.05, f"{rel} looks blank"
        assert (grey < 0.9).mean() > 0.02, f"{rel} has almost nothing drawn"


def test_spans_are_the_runs_of_true() -> None:
    assert ev.spans(np.array([0, 1, 1, 0, 1], dtype=bool)) == [(1, 3), (4, 5)]
    assert ev.spans(np.array([1, 1], dtype=bool)) == [(0, 2)]
    assert ev.spans(np.zeros(4, dtype=bool)) == []
    assert ev.spans(np.zeros(0, dtype=bool)) == []


def test_plot_without_matplotlib_is_a_clear_error(data: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as info:
        ev.main(["--data", str(data), "--plot", str(tmp_path / "plots")])
    assert info.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()
