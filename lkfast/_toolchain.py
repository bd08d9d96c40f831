"""What the compiler that builds lkfast._C can do, asked before the build (setup.py loads this file by
path, before lkfast is importable: standard library only).

The bf16 CPU kernels multiply two rows an instruction with AVX512-BF16's ``vdpbf16ps``, written as
inline assembly (csrc/cpu/dwconv_kernel.h, ``mac``). Assemblers older than binutils 2.32 (2019;
still the system one of RHEL/Rocky 8 and Debian 10) cannot encode it, and one line the assembler
rejects would fail the whole extension. setup.py asks first and, where it is missing, builds with
``LKFAST_NO_VDPBF16PS``: everything else as before, bf16 on the AVX-512 FMA path, and
``lkfast.ops.available_backends()`` saying why.
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile

# The instruction as dwconv_kernel.h writes it, in an AVX-512 function.
VDPBF16PS_PROBE = r"""
#include <immintrin.h>
#pragma GCC target("avx512f")
__m512 lkfast_probe(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
"""


def compiler() -> list:
    """The C++ compiler torch's BuildExtension runs: $CXX (one program, as torch takes it), else c++."""
    return [os.environ.get("CXX", "c++")]


def assembles_vdpbf16ps(cxx=None) -> bool:
    """Whether ``cxx`` (a command, default ``compiler()``) compiles and assembles the probe. True off
    x86-64, where the instruction is never compiled, and where ``cxx`` cannot be started at all: the
    build then fails saying that (not blaming the assembler)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    cxx = list(cxx) if cxx is not None else compiler()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(VDPBF16PS_PROBE)
        try:
            done = subprocess.run(cxx + ["-c", src, "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, timeout=120)
        except OSError:  # no compiler: not the assembler's to answer
            return True
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0
