"""In-house reference implementations of efficient-training techniques.

Nothing here knows about the harness: each module is one technique that can be
used (and tested) on its own.
"""
