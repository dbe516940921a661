#!/usr/bin/env python3
"""Benchmarks: ./tools/dev bench NAME [--json]

Each benchmark lives in ``tools/benches/NAME.py`` and defines ``run(args) -> Result``. It measures
ours and the baseline (or the limit) named in its issue side by side in the same run and prints a
table of the figures with their ratios. With ``--json`` the last line of output is one JSON object
with the keys the issue names.

Every run also saves its JSON summary to ``bench-results/NAME.json`` (``NAME.quick.json`` for
``--quick`` runs, which are not kept in git): the cost planner (``edge-agent plan``) reads the
measured latency and bytes from there. ``--no-save`` skips it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benches import Result  # noqa: E402


def available() -> list[str]:
    return sorted(
        p.stem for p in (ROOT / "tools" / "benches").glob("*.py") if not p.stem.startswith("_")
    )


def render(name: str, result: Result) -> str:
    rows = [("metric", "value", "reference / ratio")] + [
        (r.metric, r.value, r.reference) for r in result.rows
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"## bench {name}"]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.extend(result.notes)
    return "\n".join(lines)


def results_dir() -> Path:
    """Where runs are saved: $EDGE_AGENT_BENCH_RESULTS, else bench-results/ in the checkout."""
    env = os.environ.get("EDGE_AGENT_BENCH_RESULTS")
    return Path(env) if env else ROOT / "bench-results"


def save(name: str, result: Result, *, quick: bool, elapsed: float) -> Path:
    """Write the run's summary (atomically) to the results directory."""
    doc: dict[str, Any] = {
        "bench": name,
        "quick": quick,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": f"{platform.machine()} {platform.python_implementation()} "
        f"{platform.python_version()}",
        "elapsed_s": round(elapsed, 1),
        "summary": result.summary,
    }
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{'.quick' if quick else ''}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./tools/dev bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="benchmark name, or 'list'")
    parser.add_argument("--json", action="store_true", help="print the JSON summary as last line")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--no-save", action="store_true", help="do not save the summary to bench-results/"
    )
    args, rest = parser.parse_known_args(argv)
    if args.name == "list":
        print("\n".join(available()))
        return 0
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"benches.{args.name}")
    args.extra = rest
    started = time.perf_counter()
    result: Result = module.run(args)
    elapsed = time.perf_counter() - started
    print(render(args.name, result))
    print(
        f"(host: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}; ran {elapsed:.1f} s)"
    )
    if not args.no_save and result.summary:
        path = save(args.name, result, quick=args.quick, elapsed=elapsed)
        print(f"(summary saved to {path})")
    if args.json:
        print(json.dumps(result.summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
