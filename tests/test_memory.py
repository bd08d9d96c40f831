"""lkfast.memory.keep_freed_memory: glibc malloc settings for the long CPU commands."""
import ctypes
import json
import os
import subprocess
import sys

import pytest

from lkfast import memory


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param.value, value.value))
        return self.result


@pytest.fixture(autouse=True)
def no_user_settings(monkeypatch):
    for name in memory.USER_VARIABLES + ("LKFAST_MALLOC",):
        monkeypatch.delenv(name, raising=False)


def test_sets_the_three_settings():
    libc = FakeLibc()
    applied = memory.keep_freed_memory(libc)
    # M_MMAP_THRESHOLD (-3) at glibc's 64-bit maximum, M_TRIM_THRESHOLD (-1) INT_MAX, M_TOP_PAD (-2) 1 GiB
    assert libc.calls == [(-3, 32 << 20), (-1, 2 ** 31 - 1), (-2, 1 << 30)]
    assert applied == "M_MMAP_THRESHOLD=33554432, M_TRIM_THRESHOLD=2147483647, M_TOP_PAD=1073741824"


def test_leaves_malloc_alone_when_told_or_when_the_user_chose(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setenv("LKFAST_MALLOC", "default")
    assert memory.keep_freed_memory(libc) is None
    monkeypatch.setenv("LKFAST_MALLOC", "keep")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")  # the user's own glibc tuning wins
    assert memory.keep_freed_memory(libc) is None
    assert libc.calls == []
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    assert memory.keep_freed_memory(FakeLibc(result=0)) is None  # mallopt refused every setting
    monkeypatch.setenv("LKFAST_MALLOC", "always")
    with pytest.raises(ValueError, match="LKFAST_MALLOC='always': expected one of keep, default"):
        memory.keep_freed_memory(libc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_on_this_glibc_freed_tensors_are_reused_without_page_faults(tmp_path):
    """In a fresh process with the settings applied, rounds of 20 x 8 MiB tensors allocated and
    freed take no new page faults after the first rounds (glibc's defaults take 0-41k a round here,
    depending on its dynamic thresholds)."""
    if memory._glibc() is None:
        pytest.skip("not glibc")
    script = tmp_path / "faults.py"
    script.write_text(
        "import json, resource, torch\n"
        "from lkfast.memory import keep_freed_memory\n"
        "applied = keep_freed_memory()\n"
        "faults = lambda: sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ('ru_minflt', 'ru_majflt'))\n"
        "def round_():\n"
        "    ts = [torch.empty(2 << 20).fill_(1.0) for _ in range(20)]\n"
        "    del ts\n"
        "for _ in range(3): round_()\n"
        "before = faults()\n"
        "for _ in range(5): round_()\n"
        "print(json.dumps({'applied': applied, 'faults': (faults() - before) / 5}))\n")
    env = {k: v for k, v in os.environ.items() if k not in memory.USER_VARIABLES + ("LKFAST_MALLOC",)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["applied"] and "M_TRIM_THRESHOLD" in result["applied"]
    assert result["faults"] < 50, result


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"])
def test_any_of_the_users_malloc_variables_wins(monkeypatch, name):
    """Each glibc tuning variable the user may set (the three settings' own and MALLOC_ARENA_MAX,
    which glibc reads with them) leaves malloc as the user set it."""
    libc = FakeLibc()
    monkeypatch.setenv(name, "1")
    assert memory.keep_freed_memory(libc) is None and libc.calls == []
