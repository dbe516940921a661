"""The pump's signals: the channel names the anomaly models read, in the order of SKAB's CSV.

The simulated rig (drivers/sim/sources.py) produces them and every model's last axis follows
this order (agent/detect/features.py), so the device's detection needs this list, not the
simulator.
"""

from __future__ import annotations

SKAB_CHANNELS: tuple[str, ...] = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
