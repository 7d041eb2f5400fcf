"""Measurements: parity with transformers, decode speed, and `specdec bench` (harness.py)."""
