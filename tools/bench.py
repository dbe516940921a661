#!/usr/bin/env python3
"""Benchmarks: ./tools/dev bench NAME|list|all [--json] [--quick] [--dir DIR]

Each benchmark lives in ``tools/benches/NAME.py`` and defines ``run(args) -> Result`` and the
constants ``MEASURES`` and ``BASELINE`` (``bench list`` prints them). It measures ours and the
baseline (or the limit) named in its issue side by side in the same run and prints a table of the
figures with their ratios, where it ran (``--dir DIR``, default: beside the agent's data
directory; see tools/benches/__init__.py) and the filesystem type, and a ``NOT MET`` line for each
README claim the run falls short of. With ``--json`` the last line of output is one JSON object
with the keys the issue names, and always ``dir`` and ``fs_type``.

``bench all`` runs every bench, each in its own process, and writes ``ALL.md`` (``ALL.quick.md``)
to the results directory: the tables under the command, the machine and the filesystem, to paste
into the README's Performance section.

Every run also saves its JSON summary to ``docs/bench-results/NAME.json`` (``NAME.quick.json`` for
``--quick`` runs, which are not kept in git): the cost planner (``edge-agent plan``) reads the
measured latency and bytes from there. ``--no-save`` skips it.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benches import Result, locate  # noqa: E402

from agent.service.quickbench import NO_FSYNC_FS, filesystem_type  # noqa: E402

DESCRIBED = ("MEASURES", "BASELINE")  # the constants every bench module defines


def available() -> list[str]:
    return sorted(
        p.stem for p in (ROOT / "tools" / "benches").glob("*.py") if not p.stem.startswith("_")
    )


def described(name: str) -> dict[str, str]:
    """A bench module's ``MEASURES`` and ``BASELINE``, read from its source (no import: some
    benches need root or optional packages to import)."""
    tree = ast.parse((ROOT / "tools" / "benches" / f"{name}.py").read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in DESCRIBED:
                out[target.id] = ast.literal_eval(node.value)
    return out


def listing() -> str:
    """``bench list``: each bench, what it measures and its baseline."""
    lines = []
    for name in available():
        d = described(name)
        lines.append(f"{name}: {d.get('MEASURES', '(MEASURES missing)')}")
        lines.append(f"    baseline: {d.get('BASELINE', '(BASELINE missing)')}")
    return "\n".join(lines)


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
    """Where runs are saved: $EDGE_AGENT_BENCH_RESULTS, else docs/bench-results/ in the checkout."""
    env = os.environ.get("EDGE_AGENT_BENCH_RESULTS")
    return Path(env) if env else ROOT / "docs" / "bench-results"


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


def machine() -> str:
    """CPU model, cores and RAM of this machine, for the results' header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                cpu = value.strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                ram = f", {int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{ram}; {platform.system()} {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def run_all(args: argparse.Namespace, rest: list[str]) -> int:
    """Every bench, each in its own process; the combined markdown to ALL[.quick].md."""
    base, chosen = locate(args.dir)
    fs = filesystem_type(base) if base.exists() else "unknown (not created yet)"
    flags = [f for f, on in (("--quick", args.quick), ("--no-save", args.no_save)) if on]
    if args.dir:
        flags += ["--dir", str(args.dir)]
    skips = [x for name in args.skip or [] for x in ("--skip", name)]
    command = shlex.join(["./tools/dev", "bench", "all", *flags, *skips, *rest])
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    head = [
        f"Measured with `{command}` ({started}) on {machine()}.",
        f"Files in temporary directories inside {base} ({chosen}), filesystem {fs}"
        + (": durable there involves no fsync." if fs in NO_FSYNC_FS else "."),
        "Each benchmark measures ours and its baseline side by side in one run.",
        "",
    ]
    sections: list[str] = []
    summaries: dict[str, Any] = {}
    failed: list[str] = []
    names = [n for n in available() if n not in set(args.skip or [])]
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), name, "--json", *flags, *rest]
        print(f"== bench {name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        secs = time.perf_counter() - t0
        out = proc.stdout.rstrip("\n").splitlines()
        summary: Any = None
        if proc.returncode == 0 and out:
            try:
                summary = json.loads(out[-1])
                out = out[:-1]
            except ValueError:
                summary = None
        print("\n".join(out), flush=True)
        if proc.returncode != 0 or summary is None:
            failed.append(name)
            tail = proc.stderr.strip().splitlines()[-5:]
            print("\n".join(tail), file=sys.stderr, flush=True)
            sections.append(
                f"## bench {name}\n\nFAILED (exit {proc.returncode} after {secs:.0f} s): "
                + (tail[-1] if tail else "no output")
            )
            continue
        summaries[name] = summary
        body = [ln for ln in out if not ln.startswith("(summary saved to")]
        sections.append("\n".join(body))
    doc = "\n".join(head) + "\n" + "\n\n".join(sections) + "\n"
    if failed:
        doc += f"\nFailed: {', '.join(failed)}\n"
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ALL{'.quick' if args.quick else ''}.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    print(f"(combined tables written to {path})")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries, sort_keys=True))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./tools/dev bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="benchmark name, 'list' or 'all'")
    parser.add_argument("--json", action="store_true", help="print the JSON summary as last line")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="run in a new temporary directory inside DIR (default: beside the agent's data "
        "directory, /var/lib/edge-agent, else /var/tmp)",
    )
    parser.add_argument(
        "--no-save", action="store_true", help="do not save the summary to docs/bench-results/"
    )
    parser.add_argument(
        "--skip", action="append", metavar="NAME", help="with 'all': leave this bench out"
    )
    args, rest = parser.parse_known_args(argv)
    if args.name == "list":
        print(listing())
        return 0
    if args.name == "all":
        return run_all(args, rest)
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"benches.{args.name}")
    # benches with their own option parser (fleet) read --dir from there too
    args.extra = rest + (["--dir", str(args.dir)] if args.dir is not None else [])
    started = time.perf_counter()
    result: Result = module.run(args)
    elapsed = time.perf_counter() - started
    print(render(args.name, result))
    print(
        f"(host: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}; ran {elapsed:.1f} s)"
    )
    missing = [k for k in ("dir", "fs_type") if k not in result.summary]
    if missing:
        print(f"(bench {args.name} did not report {', '.join(missing)})", file=sys.stderr)
    if not args.no_save and result.summary:
        path = save(args.name, result, quick=args.quick, elapsed=elapsed)
        print(f"(summary saved to {path})")
    if args.json:
        print(json.dumps(result.summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
