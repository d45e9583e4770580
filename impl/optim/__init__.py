"""In-house optimizers, one file each; checked against references in tests/."""
