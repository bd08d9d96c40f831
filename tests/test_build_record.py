"""The record of which csrc/ lkfast._C was built from (lkfast._sources, written by setup.py): a
build older than the checkout's C++/CUDA sources is named at import, not silently run."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import lkfast.ops as ops
from lkfast import _ext
from lkfast._sources import record_path, source_hash, stale_reason, write_record
from lkfast._toolchain import assembles_vdpbf16ps, compiler

ROOT = Path(__file__).resolve().parent.parent


def test_record_names_a_build_from_other_sources(tmp_path):
    csrc = tmp_path / "csrc"
    (csrc / "cuda").mkdir(parents=True)
    (csrc / "a.cpp").write_text("int a;")
    (csrc / "a.h").write_text("#pragma once")
    (csrc / "cuda" / "k.cu").write_text("__global__ void k() {}")
    (csrc / "notes.txt").write_text("not a source")
    so = tmp_path / "_C.cpython-312-x86_64-linux-gnu.so"
    record = write_record(so, source_hash(csrc), torch="2.11.0")
    assert record == record_path(so) == tmp_path / "_C.cpython-312-x86_64-linux-gnu.sources"
    assert json.loads(record.read_text()) == {"sources": source_hash(csrc), "torch": "2.11.0"}
    assert stale_reason(so, csrc) is None
    (csrc / "notes.txt").write_text("edited")  # not a source: the build still fits
    assert stale_reason(so, csrc) is None
    (csrc / "cuda" / "k.cu").write_text("__global__ void k() { }")
    reason = stale_reason(so, csrc)
    assert reason.startswith(f"{so.name} was built from other sources than {csrc} holds now")
    assert "rebuild with `pip install --no-build-isolation -e .`" in reason
    (csrc / "cuda" / "k.cu").write_text("__global__ void k() {}")
    assert stale_reason(so, csrc) is None
    (csrc / "a.h").rename(csrc / "b.h")  # same contents, another file
    assert stale_reason(so, csrc) is not None
    # nothing to say: no sources beside the package (a wheel), or a build without a record
    assert stale_reason(so, tmp_path / "absent") is None
    record.unlink()
    assert stale_reason(so, csrc) is None


def test_this_checkouts_extension_was_built_from_its_sources():
    """setup.py writes the record beside the extension, in-place and editable builds included."""
    if _ext._C is None:
        pytest.skip(f"lkfast._C is not built here: {_ext.load_error}")
    if not (Path(_ext.__file__).resolve().parent.parent / "csrc").is_dir():
        pytest.skip("lkfast is installed without its sources: nothing to compare")
    record = record_path(_ext._C.__file__)
    assert record.is_file(), f"no {record.name} beside {_ext._C.__file__}: setup.py did not record the build"
    assert _ext.stale is None, _ext.stale


def test_available_backends_flag_a_stale_build(monkeypatch):
    if _ext._C is None:
        pytest.skip(f"lkfast._C is not built here: {_ext.load_error}")
    monkeypatch.setattr(_ext, "stale", "built from other sources")
    info = ops.available_backends()["cpu"]
    assert info.available and "STALE BUILD: built from other sources" in info.reason


@pytest.mark.parametrize("value, warns", [("AVX2", True), ("avx-2", True), ("avx2", False), ("generic", False),
                                          ("avx512", False), ("avx512bf16", False), (None, False)])
def test_a_cpu_isa_cap_the_kernels_do_not_read_is_warned_about(monkeypatch, value, warns):
    """LKFAST_CPU_ISA caps the C++ kernels' instruction set; a value they do not know (upper case, as
    ONEDNN_MAX_CPU_ISA is spelt beside it) capped nothing, silently."""
    import warnings

    if value is None:
        monkeypatch.delenv("LKFAST_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("LKFAST_CPU_ISA", value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ext._check_cpu_isa_cap()
    said = [str(w.message) for w in caught if "LKFAST_CPU_ISA" in str(w.message)]
    assert bool(said) is warns, said
    if warns:
        assert said[0].startswith(f"lkfast: LKFAST_CPU_ISA={value!r} is not one of generic, avx2, avx512, avx512bf16")


# binutils < 2.32 as far as lkfast is concerned: rejects vdpbf16ps, assembles the rest with the real as.
_OLD_AS = """#!/bin/sh
for a in "$@"; do
  case "$a" in -*) ;; *) if [ -f "$a" ] && grep -q vdpbf16ps "$a"; then
    echo "$a: Error: no such instruction: 'vdpbf16ps'" >&2; exit 1; fi;; esac
done
exec {real} "$@"
"""


def test_an_assembler_without_vdpbf16ps_builds_the_cpu_kernels_without_it(tmp_path):
    """setup.py asks the compiler first (lkfast._toolchain) and builds with LKFAST_NO_VDPBF16PS where
    the assembler cannot encode AVX512-BF16's instruction: the AVX-512 compute core must then
    compile and assemble without it (one rejected line would fail the whole extension)."""
    real_as, cxx = shutil.which("as"), shutil.which(compiler()[0])
    if platform.machine().lower() not in ("x86_64", "amd64") or not real_as or not cxx:
        pytest.skip("needs an x86-64 C++ toolchain with GNU as")
    if not assembles_vdpbf16ps():
        pytest.skip(f"{compiler()[0]}'s assembler already lacks vdpbf16ps: this build is the one tested here")
    old = tmp_path / "old_binutils"
    old.mkdir()
    (old / "as").write_text(_OLD_AS.format(real=real_as))
    (old / "as").chmod(0o755)
    old_cxx = [cxx, f"-B{old}/"]
    assert not assembles_vdpbf16ps(old_cxx)
    # no compiler at all: not put down to the assembler (setup.py's build then fails saying what is missing)
    assert assembles_vdpbf16ps([str(tmp_path / "no-such-c++")])
    done = subprocess.run(old_cxx + ["-O1", "-fopenmp", "-std=c++17", f"-I{ROOT / 'csrc'}", "-DLKFAST_NO_VDPBF16PS",
                                     "-c", str(ROOT / "csrc" / "cpu" / "dwconv_avx512.cpp"), "-o", str(tmp_path / "a.o")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_available_backends_say_why_the_cpu_kernels_run_below_this_cpus_best(monkeypatch):
    if _ext._C is None:
        pytest.skip(f"lkfast._C is not built here: {_ext.load_error}")
    real = _ext._C
    if real.cpu_isa() == "avx512bf16":
        assert real.cpu_isa_note() == ""  # nothing left out here

    class Built:  # the extension as a build without vdpbf16ps reports itself on an AVX512-BF16 CPU
        def __getattr__(self, name):
            return getattr(real, name)

        def cpu_isa_note(self):
            return "built without vdpbf16ps"

    monkeypatch.setattr(_ext, "_C", Built())
    info = ops.available_backends()["cpu"]
    assert info.available and info.reason.endswith("path (built without vdpbf16ps)")
