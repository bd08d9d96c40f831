"""glibc malloc settings for lkfast's long CPU jobs (``python -m lkfast.eval``, ``python -m lkfast.train``).

PyTorch on the CPU allocates and frees many large tensors per step. With glibc's default settings
the big ones are mapped fresh from the kernel on every allocation and handed back when freed
(``mmap``/``munmap``, and heap trimming), so each step touches its memory anew: measured on a Zen 4
EPYC (2 cores), the plain RepLKNet-31B input-gradient step took ~40-220k page faults. Keeping freed memory
in the process (a 32 MiB mmap threshold, glibc's largest; no trimming below 2 GiB; the heap grown
1 GiB at a time, which costs address space, not memory, until touched), set as environment
variables, took the faults of that step to ~0 and the step 4-8% faster for the plain and the lkfast
model alike. Set here with ``mallopt`` (trimming capped at 2 GiB): the lkfast step's faults fell to
0-18k against 16-174k, its time within noise (2 processes x 3 steps each).

``keep_freed_memory()`` applies them with ``mallopt`` at the start of those commands; the
equivalent environment variables (``MALLOC_MMAP_THRESHOLD_`` etc.) do the same for any program.
Nothing is changed where the C library is not glibc, where the user set any ``MALLOC_*_`` variable
(their choice wins), or with ``LKFAST_MALLOC=default``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = (  # (parameter, name, value): mallopt takes an int, hence INT_MAX for "never trim"
    (M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD", 32 << 20),  # glibc's maximum on 64-bit systems
    (M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD", 2 ** 31 - 1),
    (M_TOP_PAD, "M_TOP_PAD", 1 << 30),
)
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
MODES = ("keep", "default")


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # absent outside glibc (musl, macOS): AttributeError
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(libc=None) -> Optional[str]:
    """Sets ``SETTINGS`` with glibc's ``mallopt`` for this process; returns what was set, or None
    when nothing was (LKFAST_MALLOC=default, a MALLOC_*_ variable set by the user, not glibc).
    Raises ValueError for an LKFAST_MALLOC other than keep or default."""
    mode = os.environ.get("LKFAST_MALLOC", "keep")
    if mode not in MODES:
        raise ValueError(f"LKFAST_MALLOC={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "default" or any(name in os.environ for name in USER_VARIABLES):
        return None
    libc = libc if libc is not None else _glibc()
    if libc is None:
        return None
    applied = []
    for param, name, value in SETTINGS:
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:  # 1 on success, 0 on error
            applied.append(f"{name}={value}")
    return ", ".join(applied) or None
