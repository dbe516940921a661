"""Simulated parts: register-level models of each chip, serial instruments, and the physical
signal sources (a synthetic pump, SKAB replay) that drive them."""
