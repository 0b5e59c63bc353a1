"""Ctrl-C and SIGTERM during training: the loop stops with a checkpoint, never half-way through an update or a
save."""

from __future__ import annotations

import contextlib
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during training, after the state was saved (the message says where); the exit
    status is 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum``): the loop saves a checkpoint and stops."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


class Signals:
    """SIGINT and SIGTERM during the loop stop it with a checkpoint, as Ctrl-C always did. While ``held`` (an
    optimizer update, a checkpoint being written) a signal waits for the block's end: the parameters, optimizer
    moments, lr schedule and step counter are then consistent, and a second signal cannot abort the save."""

    def __init__(self):
        self.received: list[int] = []
        self.depth = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.received.append(signum)
        if self.depth == 0:
            raise Signalled(signum)

    @contextlib.contextmanager
    def held(self, deliver: bool = True):
        """Signals wait until the block ends; then (``deliver``) the first one stops the loop."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if deliver and self.depth == 0 and self.received:
            raise Signalled(self.received[0])
