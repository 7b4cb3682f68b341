"""Ctrl-C and SIGTERM: finish the current unit of work (an image, a training step), then stop."""

from __future__ import annotations

import signal
from typing import Any, Callable

from .errors import Aborted


def signal_exit_code(signum: int) -> int:
    """The exit status after stop signal ``signum``: 128 + its number, as the shell reports a
    process the signal ended (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


class StopFlag:
    """True once SIGINT or SIGTERM came; the caller checks it between units of work. A second
    signal raises :class:`Aborted` at once. ``on_first`` runs when the first one arrives."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.signal: int | None = None
        self._on_first = on_first
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise Aborted(signum)
        self.signal = signum
        if self._on_first is not None:
            self._on_first()
