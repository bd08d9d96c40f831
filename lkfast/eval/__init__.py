"""The robustness evaluation: ``python -m lkfast.eval`` (see ``lkfast.eval.cli``) and its pieces.

    run_evaluation(models, tasks, EvalOptions(...)) -> results dict (also results.json + report.md)
    ModelSpec.parse("replknet_31b:/ckpt/31b.pth=RepLKNet-31B")
    register_task(name, run, needs=..., count=...)   add a task (see lkfast.eval.registry)
    ClassSpace, imagenet_class_space()               the label set benchmarks are scored in
"""
from lkfast.eval.classes import ClassSpace, imagenet_class_space
from lkfast.eval.models import ModelSpec, Normalized, load_model
from lkfast.eval.registry import SUITES, TASKS, Task, TaskUnavailable, register_task, resolve_suite
from lkfast.eval.runner import EvalError, EvalOptions, TaskContext, run_evaluation

__all__ = ["run_evaluation", "EvalOptions", "EvalError", "ModelSpec", "Normalized", "load_model", "register_task",
           "Task", "TaskUnavailable", "TaskContext", "TASKS", "SUITES", "resolve_suite", "ClassSpace",
           "imagenet_class_space"]
