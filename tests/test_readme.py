"""README.md is checked against the code: its examples run and keep what their comments promise,
the commands and options it names exist, and the paths of its Layout exist.

* Every ```python block is run as written (``exec`` in a fresh namespace holding exactly the names
  the block takes from its surroundings: ``model``, ``x``, ``y``, ``surrogate`` for the analyses; the
  RepLKNet-31B checkpoint the model block loads is made in a temporary folder it runs in), then the
  claims of its comments are asserted, read from the comments where they are values (shapes, the
  F.conv2d expression, the listed keys and subsets). A block this file does not know fails
  ``test_every_python_block_is_run``: add its setup and checks here.
* Every command of lkfast the README runs (``python -m lkfast.<x>``, ``torchrun ... -m lkfast.<x>``,
  ``benchmarks/*``, ``.ci/*``) exists, and each of its ``--options``, in a shell block or an inline
  code span, is looked up in that command's parser, built from the code (``build_parser()``; for
  shell scripts the ``--options`` of their ``case`` patterns); each such command line is parsed
  whole. Options of other programs (pip, pytest, torchrun's own before ``-m``) are told apart by the
  command they follow; a command with options whose program is unknown fails. An option named on
  its own (`` `--shard-size` ``) must belong to one of the commands of lkfast named in its section
  (under its nearest heading), or, where that names none, in its chapter (##). The eval's suites,
  task names and ``--<benchmark>-dir`` options are checked against the lists the README gives.
* Every path in the fenced block of ``## Layout`` exists (file names without a folder: in the
  folder of their entry).
"""
from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optional_deps import needs_frost
from reference import TOLERANCE, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINES = README.read_text().splitlines()

SHELL_LANGS = {"bash", "sh", "shell", "console"}
# Programs that are not lkfast's: their options are theirs (torchrun's own are those before -m).
OTHER_PROGRAMS = {"pip", "pytest", "torchrun"}
OTHER_MODULES = {"pytest", "pip", "venv"}
# Options of other programs that the README names on their own, out of any command.
OTHER_BARE_OPTIONS = {"--no-deps": "pip", "--no-build-isolation": "pip"}


# --------------------------------------------------------------------------------------------- README


@dataclass
class Fence:
    lang: str
    start: int  # 1-based line number of the first line inside the fence
    lines: list

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Item:
    """A unit of context: a paragraph, a bullet (with its continuation lines), a table row, or a
    fenced shell block; with the section (any heading) and chapter (## heading) it is in."""
    start: int
    text: str
    section: int
    chapter: int
    shell: bool = False
    spans: list = field(default_factory=list)  # (line, code) of inline code spans, or shell lines


def parse_readme():
    fences, items = [], []
    section = chapter = 0
    current = None
    fence = None
    for number, line in enumerate(LINES, 1):
        if fence is not None:
            if line.startswith("```"):
                fences.append(fence)
                if fence.lang in SHELL_LANGS:
                    items.append(Item(fence.start, fence.text, section, chapter, shell=True,
                                      spans=shell_lines(fence)))
                fence = None
            else:
                fence.lines.append(line)
            continue
        if line.startswith("```"):
            current = None
            fence = Fence(line[3:].strip(), number + 1, [])
            continue
        heading = re.match(r"(#+) ", line)
        if heading:
            current = None
            section = number
            if len(heading.group(1)) <= 2:
                chapter = number
            continue
        if not line.strip():
            current = None
            continue
        if current is None or line.startswith("- ") or line.startswith("|"):
            current = Item(number, line, section, chapter)
            items.append(current)
        else:
            current.text += "\n" + line
    assert fence is None, f"README.md: the fence opened at line {fence.start - 1} is never closed"
    for item in items:
        if not item.shell:
            item.spans = inline_spans(item)
    return fences, items


def shell_lines(fence: Fence):
    """(line, command) of a shell block, backslash continuations joined."""
    out, pending, first = [], "", None
    for offset, line in enumerate(fence.lines):
        if first is None:
            first = fence.start + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending, first = "", None
    return out


def inline_spans(item: Item):
    if item.text.count("`") % 2:
        pytest.fail(f"README.md:{item.start}: an odd number of backticks in this paragraph, so its code spans "
                    f"cannot be read: {item.text[:200]!r}")
    spans = []
    for match in re.finditer(r"`([^`]+)`", item.text):
        spans.append((item.start + item.text.count("\n", 0, match.start()), match.group(1)))
    return spans


FENCES, ITEMS = parse_readme()


def python_blocks():
    return [f for f in FENCES if f.lang == "python"]


# -------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Cli:
    kind: str  # "module" (python -m), "python" (a .py script), "shell" (a shell script)
    name: str  # module name or path relative to the repository

    def __str__(self):
        return f"python -m {self.name}" if self.kind == "module" else self.name


@dataclass
class Command:
    line: int
    text: str
    program: object  # Cli for lkfast's, else the other program's name (str), or None (not a command)
    args: list
    runs: bool = True  # False: a module only named (`lkfast.eval`), not run


def tokens(text: str):
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: prose, not a command
        return None


def script_cli(path: str):
    """A script of the repository: .py, or a shell script (.sh or no suffix: .ci/run); None for a
    folder or a data file (benchmarks/results/...)."""
    if path.endswith("/"):
        return None
    suffix = Path(path).suffix
    if suffix == ".py":
        return Cli("python", path)
    return Cli("shell", path) if suffix in {".sh", ""} else None


def commands_in(line: int, text: str):
    """Commands of one shell line or code span, split at ; && || | &."""
    words = tokens(text)
    if not words:
        return []
    segments, current = [], []
    for word in words:
        if word in {";", "&&", "||", "|", "&"}:
            segments.append(current)
            current = []
        else:
            current.append(word)
    segments.append(current)
    commands = []
    for words in segments:
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        head = words[0]
        program, args, runs = head, words[1:], True
        if head in {"python", "python3"} and len(words) > 1:
            if words[1] == "-m" and len(words) > 2:
                module = words[2]
                program = Cli("module", module) if module.split(".")[0] == "lkfast" else module
                args = words[3:]
            elif words[1].endswith(".py"):
                program, args = Cli("python", words[1]), words[2:]
            else:
                program = f"python {words[1]}"
        elif head == "torchrun" and "-m" in words[:-1]:  # torchrun's own options come before -m
            at = words.index("-m")
            module = words[at + 1]
            program = Cli("module", module) if module.split(".")[0] == "lkfast" else module
            args = words[at + 2:]
        elif re.fullmatch(r"(benchmarks|\.ci)/[\w./-]+", head):  # tests/*.py are pytest's files
            program = script_cli(head) or head
        elif re.fullmatch(r"lkfast(\.\w+)+", head) and not args:  # a module named, not run
            program, runs = Cli("module", head), False
        commands.append(Command(line, text, program, args, runs))
    return commands


def module_parser(name: str):
    """The parser ``python -m name`` runs, from the code: the module's ``build_parser()``, or for a
    package the one of the module its ``__main__`` imports ``main`` from. None where there is none."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations is not None:
        main = Path(list(spec.submodule_search_locations)[0]) / "__main__.py"
        if not main.is_file():
            return None
        origins = [node.module for node in ast.walk(ast.parse(main.read_text()))
                   if isinstance(node, ast.ImportFrom) and any(alias.name == "main" for alias in node.names)]
        if not origins:
            return None
        name = origins[0]
    build = getattr(importlib.import_module(name), "build_parser", None)
    return build() if build else None


def script_parser(path: str):
    """A benchmark script's ``build_parser()``; a script that defines none is not run to look."""
    if "def build_parser(" not in (ROOT / path).read_text():
        return None
    spec = importlib.util.spec_from_file_location(f"readme_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build = getattr(module, "build_parser", None)
    return build() if build else None


def shell_options(path: str) -> set:
    """The --options a shell script's ``case WORD in --a|--b)`` patterns accept."""
    options = set()
    for match in re.finditer(r"\bcase\s+\S+\s+in\s+([^)\n]*)\)", (ROOT / path).read_text()):
        for pattern in match.group(1).split("|"):
            pattern = pattern.strip().strip("\"'")
            if pattern.startswith("--"):
                options.add(pattern)
    return options


_PARSERS: dict = {}


def parser_of(cli: Cli):
    """argparse parser of ``cli``, the set of a shell script's options, or an error message (str)."""
    if cli not in _PARSERS:
        if cli.kind == "module":
            parser = module_parser(cli.name)
            _PARSERS[cli] = parser if parser is not None else (
                f"no build_parser() for python -m {cli.name} (its module, or the one its __main__ takes main "
                f"from, must have one)")
        elif not (ROOT / cli.name).is_file():
            _PARSERS[cli] = f"{cli.name} does not exist in the repository"
        elif cli.kind == "python":
            parser = script_parser(cli.name)
            _PARSERS[cli] = parser if parser is not None else f"{cli.name} has no build_parser()"
        else:
            _PARSERS[cli] = shell_options(cli.name)
    return _PARSERS[cli]


def options_of(cli: Cli):
    parser = parser_of(cli)
    if isinstance(parser, argparse.ArgumentParser):
        return {option for action in parser._actions for option in action.option_strings}
    return parser  # a set (shell script) or an error message


def option_words(args):
    return [word.split("=", 1)[0] for word in args if word.startswith("--") and len(word) > 2]


ALL_COMMANDS = [command for item in ITEMS for line, text in item.spans for command in commands_in(line, text)]
OUR_COMMANDS_WITH_OPTIONS = [c for c in ALL_COMMANDS if isinstance(c.program, Cli) and option_words(c.args)]


def test_the_readme_is_read():
    """The extraction finds what the README is known to hold (a renamed fence or a changed command
    shape would otherwise leave the other tests checking nothing)."""
    named = {str(c.program) for c in OUR_COMMANDS_WITH_OPTIONS}
    for cli in ("python -m lkfast.eval", "python -m lkfast.train", "python -m lkfast.corrupt"):
        assert cli in named, f"no {cli} command with options found in README.md"
    assert len(python_blocks()) == sum(line.startswith("```python") for line in LINES)
    assert any(f.lang in SHELL_LANGS for f in FENCES)


def test_every_command_with_options_names_a_program():
    """An option follows either one of lkfast's commands or a program listed as another's here:
    nothing is skipped because its program was not recognised."""
    unknown = [f"README.md:{c.line}: {c.text.strip()!r} (program {c.program!r})" for c in ALL_COMMANDS
               if not isinstance(c.program, Cli) and option_words(c.args) and c.program is not None
               and not (isinstance(c.program, str) and (c.program in OTHER_PROGRAMS or c.program in OTHER_MODULES
                                                        or c.program.startswith("--")))]
    assert not unknown, ("options after a program this test does not know (one of lkfast's? then teach "
                         "commands_in; another tool's? add it to OTHER_PROGRAMS):\n" + "\n".join(unknown))


@pytest.mark.parametrize("command", OUR_COMMANDS_WITH_OPTIONS,
                         ids=[f"L{c.line}-{c.program}" for c in OUR_COMMANDS_WITH_OPTIONS])
def test_command_options_exist_and_the_command_parses(command):
    where = f"README.md:{command.line}: {command.text.strip()}"
    known = options_of(command.program)
    assert not isinstance(known, str), f"{where}\n  {known}"
    missing = [o for o in option_words(command.args) if o not in known]
    assert not missing, f"{where}\n  {command.program} has no option {', '.join(missing)} (it has {sorted(known)})"
    parser = parser_of(command.program)
    if isinstance(parser, argparse.ArgumentParser):
        stderr, refused = io.StringIO(), None
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(command.args)
        except SystemExit:
            refused = stderr.getvalue().strip()
        assert refused is None, f"{where}\n  {command.program} refuses this command line: {refused}"


OUR_RUN_COMMANDS = [c for c in ALL_COMMANDS if isinstance(c.program, Cli) and c.runs]


def runnable(cli: Cli) -> bool:
    if cli.kind != "module":
        return (ROOT / cli.name).is_file()
    try:
        spec = importlib.util.find_spec(cli.name)
    except ModuleNotFoundError:
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:
        return (Path(list(spec.submodule_search_locations)[0]) / "__main__.py").is_file()
    return re.search(r"^if __name__ == .__main__.:", Path(spec.origin).read_text(), re.M) is not None


def test_every_command_of_lkfast_the_readme_runs_exists():
    """Options or not: every ``python -m lkfast.<x>`` runs a module with a ``__main__``, every
    ``benchmarks/...``/``.ci/...`` script it runs is in the repository."""
    assert len(OUR_RUN_COMMANDS) > len(OUR_COMMANDS_WITH_OPTIONS)
    missing = sorted({f"README.md:{c.line}: {c.program}" for c in OUR_RUN_COMMANDS if not runnable(c.program)})
    assert not missing, "commands in README.md that do not exist:\n" + "\n".join(missing)


def _clis_in(items):
    clis = []
    for item in items:
        for line, text in item.spans:
            for command in commands_in(line, text):
                if isinstance(command.program, Cli) and command.program not in clis:
                    if not isinstance(options_of(command.program), str):
                        clis.append(command.program)
    return clis


def _bare_options():
    for item in ITEMS:
        if item.shell:
            continue
        for line, text in item.spans:
            words = tokens(text)
            if words and re.fullmatch(r"--[a-z0-9][a-z0-9-]*", words[0]):
                yield item, line, words[0]


BARE = list(_bare_options())


@pytest.mark.parametrize("item,line,option", BARE, ids=[f"L{line}{option}" for _, line, option in BARE])
def test_option_named_on_its_own_belongs_to_a_command_in_its_context(item, line, option):
    if option in OTHER_BARE_OPTIONS:
        pytest.skip(f"{option} is {OTHER_BARE_OPTIONS[option]}'s")
    scopes = [("its section", [i for i in ITEMS if i.section == item.section]),
              ("its chapter", [i for i in ITEMS if i.chapter == item.chapter])]
    # A paragraph alone is too narrow: "`--data-root` holds ... generated from `val/` with
    # `lkfast.corrupt`" names the library, not the command the option belongs to.
    for scope, items in scopes:  # the nearest scope naming any of lkfast's commands decides
        clis = _clis_in(items)
        if clis:
            assert any(option in options_of(cli) for cli in clis), (
                f"README.md:{line}: `{option}` is an option of none of the commands named in {scope} "
                f"({', '.join(map(str, clis))})")
            return
    pytest.fail(f"README.md:{line}: `{option}`: no command of lkfast is named in its section or chapter")


def test_each_benchmark_folder_has_its_dir_option():
    """'`--data-root` holds any of `val/ imagenet-a/ ...` (or name each with `--val-dir`,
    `--imagenet-a-dir`, ...)': every folder listed there has its --<folder>-dir."""
    item = next(i for i in ITEMS if i.text.startswith("- `--data-root` holds any of"))
    folders = item.spans[1][1].split()
    assert len(folders) >= 7 and all(f.endswith("/") for f in folders), folders
    known = options_of(Cli("module", "lkfast.eval"))
    missing = [f"--{f[:-1]}-dir" for f in folders if f"--{f[:-1]}-dir" not in known]
    assert not missing, f"README.md:{item.start}: python -m lkfast.eval has no {', '.join(missing)}"


def test_suites_and_task_names_are_the_evals():
    """The `--suite` bullet names the eval's suites and then its task names, all of them; every
    `--suite VALUE` in a command or a span is one the eval resolves."""
    from lkfast.eval.registry import SUITES, TASKS, resolve_suite

    parser_of(Cli("module", "lkfast.eval"))  # registers the tasks
    item = next(i for i in ITEMS if i.text.startswith("- `--suite`:"))
    text = item.text
    suites = re.findall(r"`([a-z0-9][\w-]*)`", text[:text.index("task names:")])
    tasks = re.findall(r"`([a-z0-9][\w-]*)`", text[text.index("task names:"):])
    assert suites == list(SUITES), f"README.md:{item.start}: suites {suites}, the eval's {list(SUITES)}"
    assert tasks == list(TASKS), f"README.md:{item.start}: task names {tasks}, the eval's {list(TASKS)}"
    values = [(c.line, c.args[c.args.index("--suite") + 1]) for c in OUR_COMMANDS_WITH_OPTIONS
              if c.program == Cli("module", "lkfast.eval") and "--suite" in c.args]
    values += [(line, text.split()[1]) for i in ITEMS if not i.shell for line, text in i.spans
               if text.startswith("--suite ")]
    assert len(values) >= 4, values
    for line, value in values:
        try:
            resolve_suite(value)
        except ValueError as error:
            pytest.fail(f"README.md:{line}: --suite {value}: {error}")


# ---------------------------------------------------------------------------------------------- Layout


def test_every_path_of_the_layout_exists():
    chapter = LINES.index("## Layout") + 1
    block = next(f for f in FENCES if f.start > chapter)
    assert all(not LINES[n - 1].startswith("## ") for n in range(chapter + 1, block.start)), \
        "no fenced block under ## Layout"
    entries, missing, entry_dir = [], [], ROOT
    for offset, line in enumerate(block.lines):
        number = block.start + offset
        if line and not line[0].isspace():
            entry = line.split()[0]
            entries.append(entry)
            path = ROOT / entry
            if not path.exists():
                missing.append(f"README.md:{number}: {entry}")
            entry_dir = path if entry.endswith("/") else path.parent
            line = line[len(entry):]
        for word in line.split():
            word = word.strip("(),;:")
            top = word.split("/")[0]
            is_path = "/" in word and (word.endswith("/") or re.search(r"\.\w+$", word) or (ROOT / top).exists())
            is_file = "/" not in word and re.fullmatch(r"[\w-]+\.(py|sh|h|cpp|cu|json|md|txt|toml)", word)
            if (is_path and not (ROOT / word).exists() and not (entry_dir / word).exists()) or \
                    (is_file and not (entry_dir / word).exists()):
                missing.append(f"README.md:{number}: {word}")
    assert len(entries) >= 15, entries
    assert not missing, "paths in README.md's Layout that do not exist:\n" + "\n".join(missing)


# -------------------------------------------------------------------------------------- python blocks


def free_names(source: str) -> set:
    """Names a block reads without defining them (builtins aside): what it takes from around it."""
    tree = ast.parse(source)
    stored = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            stored.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            stored.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    loaded = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return loaded - stored - set(dir(builtins))


def block_of(key: str) -> Fence:
    (block,) = [b for b in python_blocks() if key in b.lines]
    return block


def run_block(key: str, **given) -> dict:
    """Run the README's python block holding the line ``key`` as written, with only ``given`` around
    it (exactly the names it reads without defining); tracebacks point at README.md's lines."""
    block = block_of(key)
    assert free_names(block.text) == set(given), (
        f"README.md:{block.start}: the block takes {sorted(free_names(block.text))} from around it, "
        f"the test gives {sorted(given)}")
    namespace = {"__name__": "readme_block", **given}
    exec(compile("\n" * (block.start - 1) + block.text, str(README), "exec"), namespace)
    return namespace


def comment(key: str, code: str) -> str:
    """The comment on the line of block ``key`` whose code starts with ``code``: the claim checked."""
    block = block_of(key)
    comments = {tok.start[0]: tok.string[1:].strip()
                for tok in tokenize.generate_tokens(io.StringIO(block.text).readline) if tok.type == tokenize.COMMENT}
    lines = [n for n, line in enumerate(block.lines, 1) if line.startswith(code)]
    assert len(lines) == 1 and lines[0] in comments, f"README.md:{block.start}: no commented line {code!r}"
    return comments[lines[0]]


def keyword(key: str, target: str, name: str):
    """The literal keyword argument ``name`` of the call assigned to ``target`` in block ``key``."""
    for node in ast.walk(ast.parse(block_of(key).text)):
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [target]:
            return next(ast.literal_eval(k.value) for k in node.value.keywords if k.arg == name)
    raise AssertionError(f"no {target} = ...({name}=...) in the block {key!r}")


ANALYSES = "from lkfast import attacks, analysis"
OP = "from lkfast.ops import depthwise_conv2d, available_backends, plan_for"
MODELS = "from lkfast.models import create_model"
CORRUPT = "import torch, lkfast.corrupt as lc"


def test_every_python_block_is_run():
    for block in python_blocks():
        keys = [key for key in (ANALYSES, OP, MODELS, CORRUPT) if key in block.lines]
        assert len(keys) == 1, (f"README.md:{block.start}: a python block this test does not run (add its setup "
                                f"and its comments' checks to tests/test_readme.py):\n{block.text}")
    for key in (ANALYSES, OP, MODELS, CORRUPT):
        assert sum(key in block.lines for block in python_blocks()) == 1, f"no python block starts with {key!r}"


def test_analyses_block():
    """PGD and TAIG-R keep x in [0, 1] and within their eps, the parameters get no gradients; the
    kernel attention distance is per large kernel and channel (Fig. 9), the feature-map variance at
    every residual (and the stem's and transitions' outputs; Fig. 10). Given: lkfast's tiny RepLKNet (kernels 31/29/27/13) and, as the TAIG surrogate,
    the default run's tiny ViT; two 64-px images."""
    from lkfast.models import create_model

    assert comment(ANALYSES, "x_adv = attacks.pgd(") == "x in [0, 1]"
    assert comment(ANALYSES, "x_taig = attacks.taig(") == "TAIG-R transfer attack"
    assert comment(ANALYSES, "dist = ").endswith("per kernel and channel")
    assert comment(ANALYSES, "var = ").endswith("every residual")
    model = create_model("replknet_tiny_k31", num_classes=10)
    surrogate = create_model("vit_tiny_p8", num_classes=10)
    x, y = torch.rand(2, 3, 64, 64), torch.tensor([1, 7])
    ns = run_block(ANALYSES, model=model, x=x, y=y, surrogate=surrogate)

    for name in ("x_adv", "x_taig"):
        adv, eps = ns[name], keyword(ANALYSES, name, "eps")
        assert adv.shape == x.shape and adv.dtype == x.dtype, name
        assert adv.min() >= 0 and adv.max() <= 1, name
        assert (adv - x).abs().max() <= eps + 1e-6, name
        assert not torch.equal(adv, x), name
    assert all(p.grad is None for m in (model, surrogate) for p in m.parameters())  # "never accumulate gradients"

    large = [m for m in model.modules() if isinstance(m, nn.Conv2d)
             and m.groups == m.in_channels == m.out_channels and max(m.kernel_size) > 5]
    assert len(large) == 5  # one per RepLK block of replknet_tiny_k31 (stages of 1, 1, 2, 1)
    dist = ns["dist"]["layers"]
    assert [(d["kernel_size"], d["channels"]) for d in dist] == [(list(m.kernel_size), m.out_channels) for m in large]
    assert all(len(d["distance"]) == len(d["normalized"]) == d["channels"] for d in dist)

    blocks = [name for i, stage in enumerate(model.stages) for j in range(len(stage.blocks))
              for name in ((f"stages.{i}.blocks.0:in",) if j == 0 else ()) + (f"stages.{i}.blocks.{j}",)]
    var = ns["var"]
    assert var["layers"] == blocks and len(var["variance"]) == len(blocks)
    assert max(var["normalized"]) == 1.0


def test_op_block(capsys):
    """y == the comment's F.conv2d expression (to the op tests' fp32 tolerance), channels_last out;
    w.grad (fp64 reference on a few channels); x and bias get theirs when they require grad; the
    backends (with the reason of each that cannot run) and the plan are printed."""
    from lkfast.ops import available_backends, depthwise_conv2d

    claim = comment(OP, "y = depthwise_conv2d(x, w)")
    expression, layout = re.fullmatch(r"== (F\.conv2d\(.*\)); (\w+) out", claim).groups()
    assert comment(OP, "y.sum().backward()") == "w.grad; x and bias get theirs too when they require grad"
    ns = run_block(OP)
    out = capsys.readouterr().out
    x, w, y = ns["x"], ns["w"], ns["y"]

    with torch.no_grad():
        expected = eval(expression, {"F": F, "x": x, "w": w})
    assert y.shape == expected.shape, f"the README's comment says y == {expression}"
    assert rel_err(y.detach(), expected) <= TOLERANCE[torch.float32]["forward"]
    assert layout == "channels_last" and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()

    assert w.grad is not None and w.grad.shape == w.shape and x.grad is None
    channels = 4  # the reference weight gradient of a few channels, in fp64 (all 128 take PyTorch seconds)
    w64 = w.detach()[:channels].double().requires_grad_()
    F.conv2d(x[:, :channels].double(), w64, padding=15, groups=channels).sum().backward()
    assert rel_err(w.grad[:channels], w64.grad) <= TOLERANCE[torch.float32]["weight_grad"]

    xs = torch.randn(2, 4, 9, 9, requires_grad=True)
    ws, bias = torch.randn(4, 1, 7, 7, requires_grad=True), torch.randn(4, requires_grad=True)
    depthwise_conv2d(xs, ws, bias).sum().backward()
    assert xs.grad is not None and bias.grad is not None and ws.grad is not None

    assert comment(OP, "    print(info)").startswith("which backends run here, and why the others don't")
    for info in available_backends().values():
        assert str(info) in out
        assert info.available or info.reason, f"{info.name} is unavailable without a reason"
    assert comment(OP, "print(plan_for(").startswith("which backend runs each pass, and why")
    assert re.search(r"plan: forward=\w+, input_grad=\w+, weight_grad=\w+", out) and "because:" in out


def test_models_block(tmp_path, monkeypatch):
    """The block loads RepLKNet-31B_ImageNet-22K-to-1K_224.pth from where it runs: a real checkpoint
    of that name is made there (the replknet_31b factory's own weights under another seed, 79M
    parameters, ~320 MB); the model holds those weights, is in eval mode, and pretrained_cfg has
    every key the comment lists."""
    from lkfast.models import create_model

    keys = [k.strip() for k in comment(MODELS, "cfg = model.pretrained_cfg").split(",")]
    assert len(keys) >= 6 and all(re.fullmatch(r"\w+", k) for k in keys), keys
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    saved = create_model("replknet_31b").state_dict()
    torch.save(saved, "RepLKNet-31B_ImageNet-22K-to-1K_224.pth")
    torch.manual_seed(0)
    ns = run_block(MODELS)

    model, cfg = ns["model"], ns["cfg"]
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not model.training
    for key in keys:
        assert cfg.get(key) is not None, key
    assert tuple(cfg["input_size"]) == (3, 224, 224)


@needs_frost
def test_corruptions_block():
    """frost: same shape, deterministic per seed; every subset the comment lists has names (15
    common = noise + blur + weather + digital, 4 extra, 19 in all, as the text says); translate's
    sequence has the comment's shape."""
    import lkfast.corrupt as lc

    assert comment(CORRUPT, "y = lc.corrupt(") == "same shape, deterministic per seed"
    shape = ast.literal_eval(comment(CORRUPT, "seq = lc.perturbation_sequence("))
    subsets = re.findall(r'"(\w+)"', comment(CORRUPT, 'lc.names("common")'))
    ns = run_block(CORRUPT)
    x, y = ns["x"], ns["y"]
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1 and not torch.equal(y, x)
    assert torch.equal(lc.corrupt(x, "frost", 3, generator=0), y)
    assert not torch.equal(lc.corrupt(x, "frost", 3, generator=1), y)

    groups = {g: lc.names(g) for g in ["common", *subsets]}
    assert len(subsets) == 6 and all(groups.values())
    assert len(groups["common"]) == 15 and len(groups["extra"]) == 4
    assert sorted(groups["all"]) == sorted(groups["common"] + groups["extra"])
    assert sorted(sum((groups[g] for g in ("noise", "blur", "weather", "digital")), [])) == sorted(groups["common"])

    assert tuple(ns["seq"].shape) == shape, f"the README's comment says {shape}"
