"""Logging policy, stated once.

- debug: what happens under perfect conditions (each reading, each exchange);
- info: state changes (sensor recovered, link state, model swap, start and stop);
- warning: a peer or a part that misbehaves (a sensor read failed, a bad message);
- error: what loses function (a sensor down, a store that cannot write).

One line per event, ``key=value`` fields, so journald and grep both work. No secrets in logs.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def setup(level: str = "info", stream=None) -> None:  # type: ignore[no-untyped-def]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("coap").setLevel(max(root.level, logging.WARNING))
