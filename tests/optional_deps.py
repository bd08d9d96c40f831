"""Skip markers for the tests that need lkfast's media dependencies, for machines that installed
lkfast with ``--no-deps`` (the GPU check's bare machine: benchmarks/gpu_check.sh). Each skip says
what to install. CI installs them and fails if they are missing (.ci/run), so there nothing skips.

* ``needs_frost``: the ImageNet-C frost photographs (``pip install imagecorruptions-imaug`` or
  LKFAST_FROST_DIR), for the frost corruption and everything that renders all corruptions.
* ``needs_av``: PyAV (``pip install av``), for ImageNet-P's mp4 files.
"""
import importlib.util

import pytest


def _frost_missing() -> str | None:
    from lkfast.corrupt.weather import frost_directory

    try:
        frost_directory()
    except RuntimeError as exc:
        return str(exc)
    return None


FROST_MISSING = _frost_missing()
needs_frost = pytest.mark.skipif(FROST_MISSING is not None, reason=f"{FROST_MISSING}")
needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None,
                              reason="PyAV is not installed (pip install av): ImageNet-P's mp4 files need it")
