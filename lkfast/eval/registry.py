"""The task registry: adding a benchmark or an analysis to ``python -m lkfast.eval`` is one call.

    from lkfast.eval import register_task

    def my_task(ctx):                       # ctx: lkfast.eval.runner.TaskContext
        data = ctx.dataset("val")           # ImageNet-val (or the class space's own data), [0, 1] images
        rec = ctx.records("val", data, lambda x, y, indices: {"pred": ctx.forward(x).argmax(1), "target": y})
        return {"top1": 100.0 * (rec["pred"] == rec["target"]).float().mean().item()}

    register_task("my-task", my_task, needs=("val",), count=lambda ctx: len(ctx.dataset("val")))

Contract of ``run(ctx) -> dict``: returns a plain JSON-able dict of metrics (numbers, strings,
lists, nested dicts; None for a value that cannot be computed, with the reason beside it). Heavy
per-image work goes through ``ctx.records`` so that it is sharded, cached, resumable and spread over
torchrun ranks; the dict itself is cached per (model, checkpoint, task, options). Raise
``TaskUnavailable`` (with the reason) when the data the task needs is not there: the run goes on
with the other tasks and the report says why this one is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple


class TaskUnavailable(RuntimeError):
    """A task cannot run with the data and models given; the message says what is missing."""


@dataclass(frozen=True)
class Task:
    """A registered task. See the module docstring for the ``run`` contract.

    needs: the data sources the task reads (names from ``lkfast.eval.sources.SOURCE_NAMES`` or a
        task's own); used by ``--dry-run`` and to skip a task whose data is absent.
    count: ``count(ctx) -> int`` forward passes (images, or frames for sequences) the task makes;
        used by ``--dry-run`` and the progress bar. None: unknown.
    version: bump when the task's records or metrics change, so cached results are not reused.
    result_version: bump when only what the task makes of its records changes (a case it now refuses,
        a field it adds): its cached results are not served, its cached records (the forward passes)
        still are, so the new result costs no recomputation.
    cost: ``cost(ctx) -> float`` forward-pass equivalents per counted item (a backward counts as two
        forwards; default 1): ``--dry-run``'s time estimate is count x cost / measured throughput.
    reads: the options beyond the common ones the task uses: ``EvalOptions.analysis`` names (e.g.
        "dino_checkpoint"), "baseline" (the normalising model), "images" (``--analysis-images``: its
        image folders keep that many images, spread evenly) and "seed" (it draws random numbers:
        ``ctx.generators``/``ctx.seed`` refuse a task without it; its generators are on the evaluation
        device, so off the CPU its keys also hold the device type): only those join its cache keys, so
        another option does not recompute it.
    without_images: for a task that reads no images, what it reads instead (e.g. "the model's depthwise
        kernel weights"): ``--dry-run``'s note for it ("no images: reads ...", not a throughput).
    depends: ``depends(runner, spec) -> JSON-able``: what else the model's result depends on, found from
        the run (TAIG: which model of the run is its surrogate, by label and weights); joins the
        result's cache key, so that a cached result made with another is not served. None: nothing.
    """

    name: str
    run: Callable
    needs: Tuple[str, ...] = ()
    count: Optional[Callable] = None
    description: str = ""
    version: str = "1"
    reads: Tuple[str, ...] = ()
    cost: Optional[Callable] = None
    without_images: str = ""
    depends: Optional[Callable] = None
    result_version: str = "1"


TASKS: Dict[str, Task] = {}


def register_task(name: str, run: Callable, *, needs: Sequence[str] = (), count: Optional[Callable] = None,
                  description: str = "", version: str = "1", reads: Sequence[str] = (),
                  cost: Optional[Callable] = None, without_images: str = "", depends: Optional[Callable] = None,
                  result_version: str = "1", replace: bool = False) -> Task:
    """Add a task to ``python -m lkfast.eval`` (``--suite NAME`` selects it). Returns the Task.

    Raises ValueError when ``name`` is taken (pass ``replace=True`` to override on purpose) or is not
    a lower-case name of letters, digits and '-'."""
    if not name or not all(c.islower() or c.isdigit() or c == "-" for c in name):
        raise ValueError(f"register_task: task names are lower-case letters, digits and '-', got {name!r}")
    if name in TASKS and not replace:
        raise ValueError(f"register_task: a task named {name!r} is already registered")
    task = Task(name, run, tuple(needs), count, description, version, tuple(reads), cost, without_images, depends,
                result_version)
    TASKS[name] = task
    return task


# Suites: the paper's six benchmarks plus clean accuracy, in the paper's order (Section 3).
PAPER_TASKS = ("clean", "imagenet-a", "imagenet-c", "imagenet-o", "imagenet-p", "imagenet-r", "imagenet-9")
QUICK_TASKS = ("clean", "imagenet-a", "imagenet-r", "imagenet-o", "imagenet-9")
SUITES: Dict[str, Tuple[str, ...]] = {"paper": PAPER_TASKS, "quick": QUICK_TASKS}


def suites_in_list(text: str) -> List[Tuple[str, Tuple[str, ...]]]:
    """The suites named in a comma list of more than one item, with the tasks each adds (``ablation`` is a
    task and the suite of the tasks its tables need: in a list, the suite), for the run to say so."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [(i, tuple(SUITES[i])) for i in items if len(items) > 1 and i in SUITES and tuple(SUITES[i]) != (i,)]


def resolve_suite(text: str) -> Tuple[str, ...]:
    """Task names for ``--suite``: "paper", "quick", or a comma list of task names (order kept,
    duplicates dropped). Raises ValueError naming the unknown names and listing the valid ones."""
    names = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        names.extend(SUITES.get(item, (item,)))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        import difflib

        valid = list(SUITES) + list(TASKS)
        close = {n: difflib.get_close_matches(n.lower().replace("_", "-"), valid, n=1, cutoff=0.75) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {m[0]!r}?" for n, m in close.items() if m)
        raise ValueError(f"--suite: unknown task name(s) {', '.join(map(repr, unknown)) or '(none given)'}"
                         f"{f' ({hint})' if hint else ''}; valid: {', '.join(SUITES)} (suites) or {', '.join(TASKS)}")
    return tuple(dict.fromkeys(names))
