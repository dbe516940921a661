"""Sensing: opening the configured hardware (real or simulated), sampling it, and writing the
readings to the store.
"""
