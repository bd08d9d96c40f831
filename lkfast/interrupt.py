"""SIGTERM handled as Ctrl-C by the long-running commands (``python -m lkfast.eval``, ``python -m
lkfast.train``).

SIGTERM is how Slurm stops a job at its time limit or on preemption, how torchrun stops its workers
and what ``kill`` sends. Python's default ends the process at once, without a word and without the
commands' ``finally`` blocks; with ``sigterm_as_interrupt`` it raises KeyboardInterrupt where the
program is, so the command stops as on Ctrl-C (what finished is saved; one line says how to go on)
and can tell which of the two stopped it.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator, List, Tuple

EXIT_STATUS = 128 + signal.SIGTERM  # a shell's status for a process ended by SIGTERM (143)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[List[int]]:
    """Within the block SIGTERM raises KeyboardInterrupt; yields a list that holds the signal's number
    once one arrived (empty for a Ctrl-C). The handler before is put back on leaving. Outside the
    main thread, where no handler can be set, SIGTERM keeps its default."""
    received: List[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield received
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def how_stopped(received: List[int]) -> Tuple[str, int]:
    """What a command says stopped it and its exit status, given ``sigterm_as_interrupt``'s list:
    ("terminated (SIGTERM)", 143) after SIGTERM, else Ctrl-C's ("interrupted", 130)."""
    return ("terminated (SIGTERM)", EXIT_STATUS) if received else ("interrupted", 130)
