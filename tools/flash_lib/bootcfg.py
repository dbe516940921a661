"""Turning on the Raspberry Pi's I2C bus in config.txt, the way raspi-config does.

config.txt is read by the firmware top to bottom; ``[pi4]``, ``[cm5]`` ... start sections that
apply to some boards only, ``[all]`` returns to every board. ``dtparam=i2c_arm=on`` counts only
where it applies to all boards: before the first section or in an ``[all]`` section. An existing
``#dtparam=i2c_arm=on`` or ``dtparam=i2c_arm=off`` line there is changed in place; otherwise the
line is appended under ``[all]``. Nothing else in the file is touched.
"""

from __future__ import annotations

import re

LINE = "dtparam=i2c_arm=on"
_PARAM = re.compile(r"^\s*(#\s*)?dtparam\s*=\s*(i2c_arm|i2c)\s*=\s*(\w+)\s*$")
_SECTION = re.compile(r"^\s*\[([^\]]*)\]")


def enable_i2c(text: str) -> tuple[str, str | None]:
    """The new text and a one-line description of the change (None: already on)."""
    lines = text.splitlines(keepends=True)
    section = "all"
    candidate: int | None = None
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m:
            section = m.group(1).strip().lower()
            continue
        if section != "all":
            continue
        p = _PARAM.match(line.rstrip("\r\n"))
        if not p:
            continue
        commented, value = p.group(1) is not None, p.group(3).lower()
        if not commented and value == "on":
            return text, None
        if candidate is None or not commented:
            candidate = i
    if candidate is not None:
        old = lines[candidate].rstrip("\r\n")
        ending = lines[candidate][len(old) :] or "\n"
        lines[candidate] = LINE + ending
        return "".join(lines), f"change {old.strip()!r} to {LINE!r}"
    out = text
    if out and not out.endswith("\n"):
        out += "\n"
    if section != "all":
        out += "[all]\n"
    return out + LINE + "\n", f"add {LINE!r}"
