"""Loads the compiled extension lkfast._C once, remembering why it is missing when it is, and
warning when it was built from other C++/CUDA sources than the checkout's (``lkfast._sources``)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against: import torch first)

_C = None
load_error: str | None = None
stale: str | None = None  # why the loaded extension does not match csrc/ (a source checkout only)
sources: str | None = None  # the source_hash the loaded extension was built from (None: not recorded)

try:  # pragma: no cover - which branch runs depends on the install
    from lkfast import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    load_error = (
        f"lkfast._C is not available ({type(exc).__name__}: {exc}); reinstall with "
        "`pip install --no-build-isolation -e .` to build it"
    )
else:
    from lkfast._sources import built_from, stale_reason

    sources = built_from(_C.__file__)
    stale = stale_reason(_C.__file__, Path(__file__).resolve().parent.parent / "csrc")
    if stale:
        warnings.warn(f"lkfast: {stale}", RuntimeWarning, stacklevel=2)

CPU_ISA_CAPS = ("generic", "avx2", "avx512", "avx512bf16")  # the values of LKFAST_CPU_ISA the C++ kernels read


def _check_cpu_isa_cap() -> None:
    """The C++ kernels read LKFAST_CPU_ISA once and take any value but "generic", "avx2" and "avx512" as no cap:
    a misspelt one ("AVX2", as oneDNN's ONEDNN_MAX_CPU_ISA spells it) would run the best path silently."""
    import os

    value = os.environ.get("LKFAST_CPU_ISA")
    if value is not None and value not in CPU_ISA_CAPS:
        warnings.warn(f"lkfast: LKFAST_CPU_ISA={value!r} is not one of {', '.join(CPU_ISA_CAPS)} (lower case): "
                      f"it caps nothing, the kernels run this CPU's best path", RuntimeWarning, stacklevel=3)


if _C is not None:
    _check_cpu_isa_cap()
