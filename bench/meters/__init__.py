"""Measurement, in one place: the harness uses these for every adapter alike."""
