"""Core attention disaggregation (CAD, as in DistCA): attention as balanced, movable tasks.

    tasks.py     documents, query-shard tasks, pair and byte costs
    planner.py   deterministic greedy balancing of tasks over attention servers
    dispatch.py  all-to-all dispatch, one batched kernel call per nano-batch, autograd
    strategy.py  the `cad` CP strategy (scopes "cp" and "dp")
"""

from .planner import Plan, plan
from .tasks import CostModel, Doc, Run, Task, docs_from_lengths, docs_from_runs, local_runs, pairs_in

__all__ = ["Plan", "plan", "CostModel", "Doc", "Run", "Task", "docs_from_lengths", "docs_from_runs",
           "local_runs", "pairs_in"]
