"""The systemd units tools/flash installs: every ``edge-agent*`` unit of systemd/ that belongs to
the machine's role (flash_lib.roles: the gateway's are ``edge-agent-gateway*``) with its
drop-ins, enabled the way ``systemctl enable`` does it.

The list comes from the directory, so a unit added there is installed by the next flash: each
``edge-agent*.service``, ``.path`` and ``.timer`` goes to /etc/systemd/system (0644 root), each
``edge-agent*.d/*.conf`` drop-in beside it, and a unit with an ``[Install]`` section gets the
symlinks ``systemctl enable`` makes (``WantedBy=T``: ``T.wants/UNIT``, ``RequiredBy=T``:
``T.requires/UNIT``, ``UpheldBy=T``: ``T.upholds/UNIT``, ``Alias=A``: ``A``; each pointing at
/etc/systemd/system/UNIT). A unit without ``[Install]`` (one that another unit starts) is only
copied. A link into another role's unit (on a gateway, the first-boot installer's
``RequiredBy=edge-agent.service``) is not made: that unit is not installed. Nothing is removed:
a drop-in an operator added with ``systemctl edit`` stays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flash_lib.errors import FlashError
from flash_lib.plan import Dir, Entry, File, Link

PREFIX = "edge-agent"
SUFFIXES = (".service", ".path", ".timer")
ENABLE_DIRS = {"WantedBy": ".wants", "RequiredBy": ".requires", "UpheldBy": ".upholds"}

Keep = Callable[[str], bool]  # which units (by file name) to install: roles.Role.installs


def _every(name: str) -> bool:
    return True


def unit_files(systemd_dir: Path, keep: Keep = _every) -> list[Path]:
    """The unit files tools/flash installs, by name."""
    return sorted(
        p
        for p in systemd_dir.iterdir()
        if p.name.startswith(PREFIX) and p.name.endswith(SUFFIXES) and p.is_file() and keep(p.name)
    )


def dropin_files(systemd_dir: Path, keep: Keep = _every) -> list[Path]:
    """The drop-ins (``UNIT.d/*.conf``) of the units tools/flash installs, by path."""
    names = {p.name for p in unit_files(systemd_dir, keep)}
    return sorted(
        conf
        for d in systemd_dir.iterdir()
        if d.is_dir() and d.name.endswith(".d") and d.name[:-2] in names
        for conf in d.glob("*.conf")
        if conf.is_file()
    )


def install_section(text: str, source: str = "unit") -> dict[str, list[str]]:
    """The ``[Install]`` settings of a unit file: key -> values, as systemd reads them (comments,
    line continuations, space-separated lists, an empty assignment that resets the list)."""
    out: dict[str, list[str]] = {}
    section = ""
    logical: list[str] = []
    for raw in text.splitlines():
        if raw.endswith("\\"):  # continued: the backslash reads as a space
            logical.append(raw[:-1] + " ")
            continue
        line = ("".join(logical) + raw).strip()
        logical = []
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise FlashError(f"{source}: bad section header {line!r}")
            section = line[1:-1]
            continue
        if section != "Install":
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise FlashError(f"{source}: [Install] line without '=': {line!r}")
        key = key.strip()
        if value.strip():
            out.setdefault(key, []).extend(value.split())
        else:
            out[key] = []
    return out


def enable_links(unit: str, text: str, unit_dir: str, keep: Keep = _every) -> list[Entry]:
    """The entries ``systemctl enable UNIT`` makes in ``unit_dir`` (empty without [Install]),
    but for a target that is an ``edge-agent*`` unit ``keep`` leaves out."""
    entries: list[Entry] = []
    source = f"systemd/{unit}"
    for key, values in install_section(text, source).items():
        if key == "Alias":
            entries += [Link(f"{unit_dir}/{alias}", f"{unit_dir}/{unit}") for alias in values]
        elif key in ENABLE_DIRS:
            for target in values:
                if target.startswith(PREFIX) and not keep(target):
                    continue
                where = f"{unit_dir}/{target}{ENABLE_DIRS[key]}"
                entries += [
                    Dir(where, enforce=False),
                    Link(f"{where}/{unit}", f"{unit_dir}/{unit}"),
                ]
        elif key not in ("Also", "DefaultInstance"):
            raise FlashError(f"{source}: [Install] {key}= is not something tools/flash can enable")
    return entries


def triggers(systemd_dir: Path, keep: Keep = _every) -> list[str]:
    """The enabled ``.path`` and ``.timer`` units: on a live system tools/flash starts them after
    the install (no boot comes to do it), as ``systemctl enable --now`` would."""
    return [
        p.name
        for p in unit_files(systemd_dir, keep)
        if p.suffix in (".path", ".timer") and install_section(p.read_text(), f"systemd/{p.name}")
    ]


def entries(systemd_dir: Path, unit_dir: str, keep: Keep = _every) -> list[Entry]:
    """Every unit and drop-in of ``systemd_dir`` installed into ``unit_dir``, then the enable
    symlinks (after all the units, so that no link points at a unit not yet written)."""
    out: list[Entry] = []
    links: list[Entry] = []
    for path in unit_files(systemd_dir, keep):
        data = path.read_bytes()
        out.append(File(f"{unit_dir}/{path.name}", data))
        links += enable_links(path.name, data.decode("utf-8"), unit_dir, keep)
    for conf in dropin_files(systemd_dir, keep):
        where = f"{unit_dir}/{conf.parent.name}"
        out += [Dir(where, enforce=False), File(f"{where}/{conf.name}", conf.read_bytes())]
    return list(dict.fromkeys(out + links))  # a directory once: reconcile sees the target as it is
