"""Formats both sides speak: batch encodings (SenML-CBOR, compact), record bodies, state documents.

Imports nothing from the rest of the agent but its errors; the cloud endpoint imports it too.
"""
