"""Measurements: parity with transformers, decode speed, (later) the Spec-Bench harness."""
