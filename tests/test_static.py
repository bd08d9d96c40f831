"""Names that do not exist, found without running the code: a path no test reaches (a GPU branch on a
machine without one) otherwise fails only where it runs. jpeg_compression's GPU path called a helper an
earlier change had removed, unseen until pyflakes read it (b2401da)."""
import ast
from pathlib import Path

import pytest

pytest.importorskip("pyflakes", reason="pyflakes (requirements-dev.txt) reads the sources; CI installs it")
ROOT = Path(__file__).resolve().parents[1]
TREES = ("lkfast", "kernels", "benchmarks", "tests")


def undefined_names(source: str, filename: str) -> list:
    """pyflakes' undefined-name findings in one file's source, as 'file:line: message'."""
    from pyflakes import checker, messages

    kinds = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)
    found = checker.Checker(ast.parse(source, filename=filename), filename=filename).messages
    return [f"{filename}:{m.lineno}: {m.message % m.message_args}" for m in found if isinstance(m, kinds)]


def test_the_check_finds_an_undefined_name():
    assert undefined_names("def f(x):\n    return _gone(x)\n", "f.py") == ["f.py:2: undefined name '_gone'"]
    assert undefined_names("import os\ndef f():\n    return os.sep\n", "f.py") == []


def test_no_python_file_names_what_does_not_exist():
    files = sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py"))
    assert len(files) > 50
    problems = [line for p in files for line in undefined_names(p.read_text(), str(p.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)
