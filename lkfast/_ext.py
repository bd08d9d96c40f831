"""Loads the compiled extension lkfast._C once, remembering why it is missing when it is."""
from __future__ import annotations

_C = None
load_error: str | None = None

try:  # pragma: no cover - which branch runs depends on the install
    from lkfast import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    load_error = (
        f"lkfast._C is not available ({type(exc).__name__}: {exc}); reinstall with "
        "`pip install --no-build-isolation -e .` to build it"
    )
