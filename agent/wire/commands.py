"""Remote commands as both sides speak them (docs/protocol.md "Remote commands and logs"; pure
functions, no I/O).

An operator sends a command by setting the desired key ``command/<name>`` to
``{"id": uint, ? "args": {* tstr => scalar}}``; the device runs each new ``id`` once and reports
``command/<name>`` = ``{"id", "status": "ok" / "failed" / "refused", "result": {...}, "at": time}``.

The endpoint checks the shape (:func:`check_value`, part of the desired key's rule in
:mod:`agent.wire.statedoc`) and the command line checks the arguments too (:func:`check_args`);
the device checks the arguments again and reports a command it will not run as ``refused``, so a
value written around the endpoint is answered, never run.
"""

from __future__ import annotations

import time
from typing import Any

#: The commands a device knows, by name.
NAMES = ("selftest", "restart", "flush", "rotate", "logs", "requeue")
STATUSES = ("ok", "failed", "refused")
MAX_ID = 2**63 - 1
#: A time a device reports (a result's ``at``, a log window's ``since``) is Unix seconds in
#: ``[0, MAX_TIME]`` (2**40 s: about the year 36800, as agent/wire/learning.py bounds a
#: deadline); one outside is taken as absent or refused, never printed or stored as a date.
MAX_TIME = 2**40
MAX_ARG_NAME = 32
#: The text of an argument or a reason is cut to this many characters.
MAX_TEXT = 200
#: The arguments each command takes: name -> (what it is, its check).
ARGS: dict[str, dict[str, str]] = {
    "selftest": {},
    "restart": {},
    "flush": {},
    "rotate": {},
    "logs": {"since": "a Unix time in seconds (number 0..2**40)"},
    "requeue": {"seq": "the seq of one set-aside record (integer >= 1); default: all of them"},
}


class CommandError(ValueError):
    """A command value or its arguments are not what the command takes."""


def is_time(value: Any) -> bool:
    """``value`` is a Unix time in seconds in ``[0, MAX_TIME]`` (not finite: no)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= MAX_TIME  # false for NaN; a bignum compares without overflow


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def check_value(value: Any) -> str | None:
    """Why ``value`` is not a command value (``{"id", ? "args"}``), or None."""
    expected = '{"id": integer 1..2**63-1, ? "args": {name: number / text / bool}}'
    if not isinstance(value, dict) or not set(value) <= {"id", "args"}:
        return expected
    if not _is_id(value.get("id")):
        return expected
    args = value.get("args", {})
    if not isinstance(args, dict):
        return expected
    for key, item in args.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_ARG_NAME:
            return expected
        if not isinstance(item, int | float | str | bool):
            return expected
    return None


def check_args(name: str, args: Any) -> dict[str, Any]:
    """The arguments of command ``name``, checked (:class:`CommandError` says what is wrong)."""
    if name not in ARGS:
        raise CommandError(f"unknown command {name[:MAX_ARG_NAME]!r} (known: {', '.join(NAMES)})")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError(f"{name}: the arguments must be a map")
    takes = ARGS[name]
    for key in args:
        if key not in takes:
            known = ", ".join(takes) or "none"
            raise CommandError(f"{name}: no argument {str(key)[:MAX_ARG_NAME]!r} (takes: {known})")
    if name == "logs" and "since" in args:
        since = args["since"]
        if not is_time(since):
            raise CommandError(f"logs: since must be {ARGS['logs']['since']}")
    if name == "requeue" and "seq" in args:
        seq = args["seq"]
        if type(seq) is not int or not 1 <= seq <= MAX_ID:
            raise CommandError(f"requeue: seq must be {ARGS['requeue']['seq']}")
    return dict(args)


def new_id(last: int | None, now: float | None = None) -> int:
    """A fresh command id: milliseconds of the wall clock, above ``last`` (the newest id the
    operator issued: never one a device reported). :class:`CommandError` past :data:`MAX_ID`."""
    ms = int((time.time() if now is None else now) * 1000)
    fresh = max(ms, (last or 0) + 1)
    if fresh > MAX_ID:
        raise CommandError(f"no command id is left above {last}: check the commands table")
    return fresh


def result_value(command_id: int, status: str, result: dict[str, Any], at: float) -> dict[str, Any]:
    """The reported ``command/<name>`` value."""
    return {"id": command_id, "status": status, "result": result, "at": at}


def parse_result(value: Any) -> tuple[int, str, Any, float | None] | None:
    """(id, status, result, at) of a reported ``command/<name>`` value, or None if it is not
    one (the endpoint keeps it as reported state all the same)."""
    if not isinstance(value, dict) or not _is_id(value.get("id")):
        return None
    status = value.get("status")
    if status not in STATUSES:
        return None
    at = value.get("at")  # a time outside [0, MAX_TIME] (a clock far off, 1e300): absent
    return value["id"], status, value.get("result"), float(at) if is_time(at) else None
