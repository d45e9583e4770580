"""Gradient-readiness hooks shared by data parallel and ZeRO.

Parameters are split into groups (DDP buckets, ZeRO units). A
post-accumulate-grad hook counts arrivals; when a group's last gradient is
accumulated, ``on_ready(i)`` launches its communication, so it overlaps the
rest of backward. A callback queued on the autograd engine then calls
``on_end(not_ready)`` once, after the whole backward, with the groups that
never completed (parameters that got no gradient): they must still be
reduced, or ranks would disagree on the collectives they issue.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class GradReadyHooks:
    def __init__(self, groups: list[list[nn.Parameter]], *, on_ready: Callable[[int], None],
                 on_end: Callable[[list[int]], None]) -> None:
        self.sizes = [len(g) for g in groups]
        self.pending = list(self.sizes)
        self.on_ready, self.on_end = on_ready, on_end
        self.enabled = True
        """False inside no_sync: gradients only accumulate locally."""
        self._group_of = {id(p): i for i, g in enumerate(groups) for p in g}
        self._queued = False
        for g in groups:
            for p in g:
                p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: nn.Parameter) -> None:
        if not self.enabled:
            return
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end)
            self._queued = True
        i = self._group_of[id(p)]
        self.pending[i] -= 1
        if self.pending[i] == 0:
            self.on_ready(i)

    def _end(self) -> None:
        not_ready = [i for i, n in enumerate(self.pending) if n > 0]
        self.pending = list(self.sizes)
        self._queued = False
        self.on_end(not_ready)
