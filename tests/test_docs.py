"""README.md and docs/*.md point only at files that exist: their links and images, the repository
paths they name in code spans (``benchmarks/results/models_cpu_zen5.md``), and the result files
they name without the folder (``depthwise_cpu_zen5_avx2.md``: in ``benchmarks/results/``). A figure
or a benchmark table renamed, moved or never committed fails here, naming the line."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
SPAN = re.compile(r"`([^`\s]+)`")
FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+\.(?:md|json|png|txt|csv)")
# Result files named without their folder start like a committed one (depthwise_, models_, ...);
# other bare names (report.md, gpu_bench.json) are what a command writes, not a committed file.
RESULT_PREFIXES = sorted({p.name.split("_")[0] + "_" for p in RESULTS.iterdir() if p.is_file() and "_" in p.name})
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} | {".ci"}


def named_paths(doc: Path):
    """(line number, what the line names, the path it must resolve to) for each checked reference."""
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            yield number, target, doc.parent / target.split("#")[0]
        for span in SPAN.findall(line):
            span = span.rstrip(".,;:")
            if any(c in span for c in "*<>[]$~=") or span.startswith(("-", "/")):
                continue  # globs, placeholders, options, absolute or home paths
            if "/" in span and span.split("/")[0] in TOP_LEVEL:
                yield number, span, ROOT / span
            elif "/" not in span and FILE_NAME.fullmatch(span) and span.startswith(tuple(RESULT_PREFIXES)):
                yield number, span, RESULTS / span


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(doc):
    refs = list(named_paths(doc))
    assert refs, f"{doc.relative_to(ROOT)}: no references found (has the parsing broken?)"
    missing = [f"{doc.relative_to(ROOT)}:{n}: {text}" for n, text, path in refs if not path.exists()]
    assert not missing, "files named in the docs that do not exist:\n" + "\n".join(missing)


def test_result_prefixes_are_read():
    # The bare-name check rests on these; an empty list would let every bare name through.
    assert {"depthwise_", "models_", "pointwise_"} <= set(RESULT_PREFIXES)


# ------------------------------------------------------------------------------ environment variables
MACROS = {"LKFAST_WITH_CUDA", "LKFAST_NO_VDPBF16PS"}  # setup.py's compile-time defines (CUDA bindings; no vdpbf16ps), not read from the environment


def variables_the_code_reads() -> set:
    """Every string literal that is exactly an LKFAST_* name in lkfast/, kernels/ and setup.py (what
    ``os.environ`` is asked for), and every ``getenv("LKFAST_...")`` in csrc/."""
    import ast

    names = set()
    for path in [*(ROOT / "lkfast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), ROOT / "setup.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"LKFAST_[A-Z0-9_]+", node.value):
                names.add(node.value)
    for path in (ROOT / "csrc").rglob("*.[ch]*"):
        names.update(re.findall(r'getenv\("(LKFAST_[A-Z0-9_]+)"\)', path.read_text()))
    return names - MACROS


def test_the_readme_lists_every_environment_variable_the_code_reads():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^### Environment variables\n(.*?)(?=^#)", text, re.S | re.M)
    assert section, "README.md has no '### Environment variables' section"
    listed = set(re.findall(r"LKFAST_[A-Z0-9_]+", section.group(1)))
    read = variables_the_code_reads()
    assert {"LKFAST_CACHE", "LKFAST_CALIBRATE", "LKFAST_CPU_ISA"} <= read  # the scan finds what it must
    assert not read - listed, f"read by the code, missing from README's Environment variables: {sorted(read - listed)}"
    assert not listed - read, f"in README's Environment variables, read nowhere in the code: {sorted(listed - read)}"
