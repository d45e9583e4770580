"""The default training source's parameters, torch-free so the theory can read
them (bench.workloads.train.global_batch draws the rows; bench.theory.convergence
gives their loss floor)."""
from __future__ import annotations

STRIDES = 8
"""Strides 1..STRIDES, uniform: a row is (start + stride·i) mod V."""
