"""Driver names as they appear in configuration, and where their classes live."""

from __future__ import annotations

import importlib
from typing import Any

DRIVERS: dict[str, str] = {
    "bme280": "drivers.bme280:Bme280",
    "adxl345": "drivers.adxl345:Adxl345",
    "ina219": "drivers.ina219:Ina219",
    "ads1115": "drivers.ads1115:Ads1115",
    "mcp9600": "drivers.mcp9600:Mcp9600",
    "modbus": "drivers.modbus:ModbusInstrument",
    "line": "drivers.line:LineSensor",
}


def driver_class(name: str) -> Any:
    """The driver class registered as ``name``. Raises KeyError for an unknown name."""
    module, _, attr = DRIVERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
