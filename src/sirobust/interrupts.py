"""Stopping cleanly on SIGINT and SIGTERM.

A long job asked to stop (Ctrl-C, ``kill``, a cluster's pre-emption signal)
should keep what it finished and say how to continue. :func:`graceful_stop`
turns the first SIGINT/SIGTERM into a flag that the job checks at points where
its state is consistent (after a training batch); the job saves and raises
:class:`RunInterrupted`. A second signal interrupts at once (KeyboardInterrupt),
which still runs every ``finally`` (locks released, temporary files removed).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class RunInterrupted(KeyboardInterrupt):
    """The job stopped on a signal after saving its progress; the message says how to continue."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        # None: stopped because another process of a torchrun group received the signal
        self.signum = signal.SIGTERM if signum is None else signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """Set when a stop signal arrived; ``signum`` says which."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, the first SIGINT/SIGTERM sets the returned flag; a second raises KeyboardInterrupt.

    Outside the main thread (where Python cannot install handlers) the flag is never set."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    # the process's own stderr, not fd 2 blindly: with stderr closed at start, fd 2 may be a file the job opened
    err = sys.__stderr__

    def handler(signum, _frame):
        if stop.requested:  # the second: at once (SIGTERM's exit status stays 143)
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        stop.signum = signum
        # the job may be inside a long step (an AutoAttack batch): say that the signal was heard. os.write, not
        # print: a handler that prints while the interrupted code writes to stderr (a progress bar) would raise
        # "reentrant call" at that point
        with contextlib.suppress(OSError, ValueError, AttributeError):  # (no stderr, or a closed one)
            os.write(err.fileno(), f"sirobust: {stop.name} received; stopping after the current step, which is saved "
                                   "(a second Ctrl-C or SIGTERM stops at once)\n".encode())

    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    global _pending
    _pending = None  # one from an earlier block belongs to a job that is over
    try:
        yield stop
        if stop.requested:  # the block finished its job without stopping (a run's last epoch): tell the caller
            _pending = stop.signum
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


_pending: Optional[int] = None  # a signal that a graceful_stop block received and finished its job anyway


def take_pending_stop() -> Optional[int]:
    """The signal a :func:`graceful_stop` block received without stopping, because its job was done (a training
    run asked to stop in its last epoch completes it), then forgotten. A caller with more to do (``compare``,
    ``reproduce``: the next run) checks this after each such job, so that the request is not lost."""
    global _pending
    signum, _pending = _pending, None
    return signum


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt (so that every cleanup runs), exiting 143 as the shell expects."""

    exit_code = 128 + int(signal.SIGTERM)


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt (as SIGINT does), so cleanup code runs on ``kill``."""
    if threading.current_thread() is threading.main_thread():
        def handler(signum, _frame):
            raise Terminated
        signal.signal(signal.SIGTERM, handler)
