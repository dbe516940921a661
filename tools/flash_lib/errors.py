"""The one error tools/flash reports: a single line saying what is wrong and what to do."""

from __future__ import annotations


class FlashError(Exception):
    """Stops tools/flash with exit status 1 and this message on stderr."""
