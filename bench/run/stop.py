"""A graceful stop for `bench run`: the first SIGINT or SIGTERM stops launching,
the running launch's process group is killed (the launchers do that on any
exception, ``bench.run.launchers``) and its partial output is never recorded;
a second signal exits at once. Record appends are a critical section: a signal
arriving mid-append takes effect after the whole line is written."""
from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main thread by the first stop signal (a BaseException, like
    KeyboardInterrupt, so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Guard:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._depth = 0
        self._raised = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # the second signal: no more cleaning up
            os._exit(128 + signum)
        self.signum = signum
        if self._depth == 0:
            self._raised = True
            raise Stopped(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self.signum, self._raised = None, False
        self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)
            self._previous = {}

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Defer a stop signal until the block is done (a record is written whole)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self.signum is not None and not self._raised and self._previous:
                self._raised = True
                raise Stopped(self.signum)


guard = _Guard()
