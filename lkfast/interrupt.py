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
    previous_int = signal.getsignal(signal.SIGINT)  # (ignore_further_interrupts may set it)
    try:
        yield received
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            if previous_int is not None:  # (None: a handler set outside Python, which cannot be put back)
                signal.signal(signal.SIGINT, previous_int)


def ignore_further_interrupts() -> None:
    """Ignore Ctrl-C and SIGTERM from now on: called by a command's handler of the first one, so that a
    second (the impatient double Ctrl-C) does not land in the handler, or in the clean-up after it, as a
    traceback after the line that says how to go on. ``sigterm_as_interrupt`` puts both handlers back
    on leaving its block. Outside the main thread it does nothing."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def how_stopped(received: List[int]) -> Tuple[str, int]:
    """What a command says stopped it and its exit status, given ``sigterm_as_interrupt``'s list:
    ("terminated (SIGTERM)", 143) after SIGTERM, else Ctrl-C's ("interrupted", 130)."""
    return ("terminated (SIGTERM)", EXIT_STATUS) if received else ("interrupted", 130)
