"""The offline wheel bundle: this project's wheel, every dependency's wheel for the target, and pip.

Built on the build host with pip (``pip wheel`` of this checkout, ``pip download`` of the wheels
the target's lock names, each checked against its SHA-256: tools/flash_lib/lock.py), so the
device installs with ``--no-index`` and needs no internet, and every device gets the same
bytes. ``bundle.json`` lists the files with their SHA-256; the bundle id is a hash of that
list, recorded in the device's venv to tell whether it is current.

The project wheel is built with a fixed SOURCE_DATE_EPOCH so that the same source gives the same
bytes: a second ``tools/flash`` run then finds nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flash_lib import lock as lockmod
from flash_lib.errors import FlashError
from flash_lib.progress import Progress

BUNDLE_JSON = "bundle.json"
ARCHES = ("x86_64", "aarch64")
DEFAULT_GLIBC = {"x86_64": "2.36", "aarch64": "2.36"}  # Debian 12 / Raspberry Pi OS Bookworm
SOURCE_DATE_EPOCH = "946684800"  # 2000-01-01: reproducible zip timestamps in the project wheel
_SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


@dataclass(frozen=True)
class Bundle:
    dir: Path
    arch: str
    python: str
    project: str  # file name of the project's wheel
    pip: str  # file name of pip's wheel
    files: dict[str, str]  # file name -> sha256

    @property
    def id(self) -> str:
        listing = "".join(f"{name} {digest}\n" for name, digest in sorted(self.files.items()))
        return hashlib.sha256(listing.encode()).hexdigest()[:20]

    @property
    def total_bytes(self) -> int:
        return sum((self.dir / name).stat().st_size for name in self.files)


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


def host_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(directory: Path, *, verify: bool = True) -> Bundle:
    """The bundle in ``directory``; FlashError if it is missing, incomplete or corrupt."""
    meta_path = directory / BUNDLE_JSON
    try:
        meta = json.loads(meta_path.read_text())
        files = {str(k): str(v) for k, v in meta["files"].items()}
        bundle = Bundle(
            dir=directory,
            arch=str(meta["arch"]),
            python=str(meta["python"]),
            project=str(meta["project"]),
            pip=str(meta["pip"]),
            files=files,
        )
    except FileNotFoundError:
        raise FlashError(
            f"{directory} is not a wheel bundle (no {BUNDLE_JSON}): "
            f"build one with `tools/flash bundle {directory}`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FlashError(f"{meta_path}: not a valid bundle description ({err})") from None
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise FlashError(f"bundle {directory}: {name} is missing; rebuild the bundle")
        if verify and sha256_file(path) != digest:
            raise FlashError(f"bundle {directory}: {name} does not match its SHA-256; rebuild it")
    return bundle


def platform_args(arch: str, python: str, glibc: str) -> list[str]:
    """pip download options for a foreign target: every manylinux tag its glibc can load."""
    major, minor = (int(x) for x in glibc.split("."))
    tags = [f"manylinux2014_{arch}"] + [
        f"manylinux_{major}_{m}_{arch}" for m in range(17, minor + 1)
    ]
    args = ["--python-version", python, "--implementation", "cp"]
    for tag in tags:
        args += ["--platform", tag]
    return args


def _source_files(root: Path) -> list[Path]:
    """The checkout's files (tracked and untracked, not ignored), relative to ``root``."""
    if (root / ".git").exists() and shutil.which("git"):
        proc = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            check=False,
        )
        if proc.returncode == 0:
            names = [n for n in proc.stdout.decode().split("\0") if n]
            return [Path(n) for n in names if (root / n).is_file()]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".venv")]
        out += [Path(dirpath, f).relative_to(root) for f in filenames if not f.endswith(".pyc")]
    return out


def _pip(pip_python: str, args: list[str], progress: Progress, cwd: Path | None = None) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    cmd = [pip_python, "-m", "pip", *args, "--progress-bar", "off"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-30:], line.rstrip()]
        stripped = line.strip()
        if stripped.startswith(("Saved ", "File was already downloaded", "Created wheel")):
            progress.advance(1, stripped.rsplit("/", 1)[-1][:60])
    if proc.wait() != 0:
        shown = "\n  ".join(x for x in tail if x and not x.startswith("WARNING: Location"))
        raise FlashError(f"pip {args[0]} failed ({' '.join(cmd[:4])} ...):\n  {shown}")


def pip_python_default(project_root: Path) -> str:
    venv = project_root / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def build(
    out: Path,
    project_root: Path,
    *,
    arch: str,
    python: str,
    glibc: str | None = None,
    pip_python: str | None = None,
) -> Bundle:
    """Build (or refresh) the bundle in ``out`` for a target of ``arch`` running ``python``."""
    if arch not in ARCHES:
        raise FlashError(
            f"no wheels for {arch}: numpy and LiteRT publish {' and '.join(ARCHES)} wheels only "
            "(use a 64-bit OS on the Pi)"
        )
    pip_python = pip_python or pip_python_default(project_root)
    check = subprocess.run([pip_python, "-m", "pip", "--version"], capture_output=True, check=False)
    if check.returncode != 0:
        raise FlashError(f"no pip for {pip_python}: install pip or pass --pip-python PYTHON")
    lock = lockmod.lock_for(project_root, arch, python)
    foreign = arch != host_arch() or python != host_python()
    progress = Progress(f"building wheel bundle ({arch}, Python {python})", unit="files")
    with tempfile.TemporaryDirectory(prefix="edge-agent-bundle-") as tmp:
        src, wheels, staging = Path(tmp, "src"), Path(tmp, "wheel"), Path(tmp, "staging")
        for rel in _source_files(project_root):
            dest = src / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project_root / rel, dest)
        _pip(pip_python, ["wheel", "--no-deps", "--wheel-dir", str(wheels), str(src)], progress)
        built = sorted(wheels.glob("*.whl"))
        if len(built) != 1:
            raise FlashError(f"pip wheel made {len(built)} wheels from {project_root}, expected 1")
        project_wheel = built[0]
        target = platform_args(arch, python, glibc or DEFAULT_GLIBC[arch]) if foreign else []
        # exactly the locked wheels, each checked against its SHA-256 ...
        args = ["download", "--dest", str(staging), "--only-binary=:all:", "--no-deps"]
        _pip(pip_python, [*args, *target, "--require-hashes", "-r", str(lock)], progress)
        shutil.copy2(project_wheel, staging / project_wheel.name)
        # ... and the project's requirements resolve from them alone
        try:
            _pip(
                pip_python,
                ["install", "--dry-run", "--ignore-installed", "--no-index", "--find-links",
                 str(staging), "--only-binary=:all:", "--target", str(Path(tmp, "t")), *target,
                 str(project_wheel)],
                progress,
            )  # fmt: skip
        except FlashError as err:
            raise FlashError(
                f"the lock {lock} does not hold what the project needs: run ./tools/dev lock "
                f"({err})"
            ) from None
        progress.done()
        names = sorted(p.name for p in staging.glob("*.whl"))
        pips = [n for n in names if n.startswith("pip-")]
        if len(pips) != 1 or project_wheel.name not in names:
            raise FlashError(f"pip download did not fetch the expected wheels: {names}")
        out.mkdir(parents=True, exist_ok=True)
        (out / BUNDLE_JSON).unlink(missing_ok=True)
        for old in out.glob("*.whl"):
            if old.name not in names:
                old.unlink()
        files = {}
        for name in names:
            digest = sha256_file(staging / name)
            dest = out / name
            if not dest.is_file() or sha256_file(dest) != digest:
                shutil.copyfile(staging / name, dest)
            files[name] = digest
    meta = {
        "arch": arch,
        "python": python,
        "project": project_wheel.name,
        "pip": pips[0],
        "files": files,
    }
    (out / BUNDLE_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return load(out, verify=False)
