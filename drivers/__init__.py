"""Sensor drivers: one module per part, each with its register map as data, pure conversion
functions and a thin async class that takes its bus as an argument."""
