"""Evaluation: task kinds, a batched runner and an on-disk result cache.

    from souplm.evaluate import evaluate
    report = evaluate("path/to/model", ["shakespeare-ppl", "my_task.yaml"], limit=50, cache=True)
"""

from .cache import ResultCache
from .runner import aggregate, evaluate, score_rows
from .tasks import Task, load_task

__all__ = ["ResultCache", "Task", "aggregate", "evaluate", "load_task", "score_rows"]

from .._callable import make_callable

make_callable(__name__, "evaluate")  # souplm.evaluate(model, tasks) calls evaluate(model, tasks)
