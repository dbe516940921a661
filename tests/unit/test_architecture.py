"""The house's rules, checked from the source with the standard library's ``ast``.

- Packages depend downwards only: each package may import the packages listed for it in
  :data:`ALLOWED` (``drivers`` <- ``agent`` <- ``cloud``; inside the agent, wire <- store <- sense,
  detect, modelstore <- sync <- service), never a package above it.
- The endpoint (``cloud``) imports from the agent only the formats both sides speak
  (``agent.wire``), model signing and the interpreter seam, and the agent's helpers.
- No import cycles between modules (lazy imports inside functions count too; imports only for
  type checkers, under ``if TYPE_CHECKING:``, do not).
- No module over :data:`MAX_LINES` lines, and every module starts with a docstring.
- The repository's top level holds only :data:`TOP_LEVEL` (what the product owner fixed).

A new upward import or cycle fails here with the import named.
"""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("drivers", "agent", "cloud")
MAX_LINES = 800
#: The top level the product owner fixed (plus the dotfiles git and CI need).
TOP_LEVEL = {
    "pyproject.toml",
    "README.md",
    "agent",
    "drivers",
    "models",
    "systemd",
    "tests",
    "tools",
    "cloud",
    "docs",
    ".ci",
    ".gitignore",
}

#: package -> the packages its modules may import (besides itself). ``agent`` is the agent's own
#: top level (errors, files, logsetup, metrics, version): helpers every agent package uses.
ALLOWED: dict[str, set[str]] = {
    "drivers": set(),
    "agent": {"drivers"},
    "agent.wire": {"agent", "drivers"},
    "agent.store": {"agent.wire", "agent", "drivers"},
    "agent.detect": {"agent.store", "agent.wire", "agent", "drivers"},
    "agent.sense": {"agent.store", "agent.wire", "agent", "drivers"},
    "agent.learn": {"agent.sync", "agent.detect", "agent.store", "agent.wire", "agent", "drivers"},
    "agent.sync": {"agent.detect", "agent.store", "agent.wire", "agent", "drivers"},
    "agent.modelstore": {"agent.sync", "agent.detect", "agent.wire", "agent", "drivers"},
    # a gateway serves its devices with the endpoint's own server and store (docs/gateway.md)
    "agent.gateway": {
        "cloud",
        "agent.ota",  # releases relayed to the devices behind it
        "agent.modelstore",
        "agent.sync",
        "agent.store",
        "agent.wire",
        "agent",
        "drivers",
    },
    "agent.service": {
        "agent.ota",
        "agent.gateway",
        "agent.learn",
        "agent.modelstore",
        "agent.sync",
        "agent.sense",
        "agent.detect",
        "agent.store",
        "agent.wire",
        "agent",
        "drivers",
    },
    "agent.ota": {
        "agent.modelstore",
        "agent.sync",
        "agent.store",
        "agent.wire",
        "agent",
        "drivers",
    },
    "cloud": {"agent.wire", "agent", "drivers"},
}
#: Single modules a package (or one module) may import beyond its allowed packages.
ALLOWED_MODULES: dict[str, set[str]] = {
    # model files: the endpoint signs manifests and runs the full-precision models
    "cloud": {
        "agent.modelstore.signing",
        "agent.ota.release",
        "agent.detect.inference",
        "agent.learn.autoencoder",
    },
    # the demo starts a local endpoint beside the agent (imported lazily, never on a device)
    "agent.service.demo": {"cloud.server"},
}


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "agent":
        return parts[0]
    if len(parts) >= 2 and (ROOT / "agent" / parts[1]).is_dir():
        return f"agent.{parts[1]}"
    return "agent"


def imports(path: Path, module: str, known: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of a project module, at any depth; imports
    under ``if TYPE_CHECKING:`` are for type checkers only and are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If)
        and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
                base = ".".join([*parent, base] if base else parent)
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield node.lineno, name


def graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    known = modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in known}
    for module, path in known.items():
        for line, target in imports(path, module, known):
            edges[module].setdefault(target, line)
    return known, edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_packages_import_only_downwards() -> None:
    known, edges = graph()
    wrong = []
    for module, targets in edges.items():
        pkg = package_of(module)
        assert pkg in ALLOWED, f"{module}: package {pkg} has no entry in ALLOWED"
        for target, line in targets.items():
            tpkg = package_of(target)
            extra = ALLOWED_MODULES.get(pkg, set()) | ALLOWED_MODULES.get(module, set())
            if tpkg == pkg or tpkg in ALLOWED[pkg] or target in extra:
                continue
            wrong.append(f"{known[module].relative_to(ROOT)}:{line}: {module} imports {target}")
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


#: The modules that build the simulated rig (its config, the demo, the on-device quick bench):
#: the only agent modules that may import the simulator (``drivers.sim``). Detection, the queue,
#: sync and the rest run on real hardware without it.
SIM_USERS = {
    "agent.sense.simrig",
    "agent.sense.settings",
    "agent.service.config",
    "agent.service.quickbench",
}


def test_only_the_simulated_rig_imports_the_simulator() -> None:
    known, edges = graph()
    wrong = [
        f"{known[module].relative_to(ROOT)}:{line}: {module} imports {target}"
        for module, targets in edges.items()
        if not module.startswith("drivers.") and module not in SIM_USERS
        for target, line in targets.items()
        if target == "drivers.sim" or target.startswith("drivers.sim.")
    ]
    assert not wrong, "the simulator imported outside the simulated rig:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    _, edges = graph()
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_modules_are_small_and_say_their_job() -> None:
    too_long, no_doc = [], []
    for path in modules().values():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        if not ast.get_docstring(ast.parse(text)) and text.strip():
            no_doc.append(str(path.relative_to(ROOT)))
    assert not too_long, f"modules over {MAX_LINES} lines:\n" + "\n".join(too_long)
    assert not no_doc, "modules without a docstring:\n" + "\n".join(no_doc)


def tracked_top_level() -> set[str]:
    """The first path component of every file git tracks in this checkout."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    return {name.split("/", 1)[0] for name in out.decode().split("\0") if name}


def test_the_top_level_is_the_fixed_one() -> None:
    extra = tracked_top_level() - TOP_LEVEL
    assert not extra, f"tracked at the top level besides {sorted(TOP_LEVEL)}: {sorted(extra)}"


def test_the_checks_find_what_they_look_for() -> None:
    """The cycle finder and the package order on a hand-made graph (a check that cannot fail
    is no check)."""
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
    assert package_of("agent.wire.codec") == "agent.wire"
    assert package_of("agent.errors") == "agent"
    assert package_of("drivers.sim.bme280") == "drivers"
    assert "agent.service" not in ALLOWED["agent.wire"]
