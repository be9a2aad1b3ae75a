"""The one per-step pipeline every front end adapts to.

- :class:`Engine` (``pipeline.py``): agreement check, warm-up, small-bucket policy,
  error feedback, encode, size exchange, dense fallback, one all-gather, decode and sum
  in rank order, stats.
- ``messages.py``: :func:`read_message` checks one received message against this rank's
  segments; the ranks' parts are summed in rank order (every scheme reads and sums there).
- ``shared_index.py``: the ``"shared_index"`` scheme for compressed buckets (a rotating
  leader broadcasts its index set, one allreduce of the values there).
- ``hierarchical.py``: the node schemes (dense inside a node, compressed between nodes),
  over ``nodes.py``'s per-node sub-groups.
- ``plan.py``: ``compressor="auto"`` (:class:`AutoPlan`): per bucket, dense, fp16 or a
  sparse spec, from the measured link and compression cost.
- ``memory.py`` (error feedback), ``stats.py`` (counters), ``framing.py`` (one message
  per bucket), ``agreement.py`` (the configuration check).
- ``flat.py`` and ``gradients.py``: named tensors packed into flat buffers, for the front
  ends without a DDP reducer (Horovod, mpi4py, the update mode).

Front ends: :mod:`deepreduce.hooks` (DDP), :mod:`deepreduce.horovod`,
:mod:`deepreduce.mpi`, :mod:`deepreduce.optim` (compressed updates).
"""

from .flat import FlatGroup, plan_groups, reduce_named
from .gradients import GradientSync
from .memory import ErrorFeedback, memory_dtype
from .messages import read_message
from .pipeline import Engine
from .plan import AutoPlan
from .segments import Segment
from .stats import CommStats

__all__ = ["AutoPlan", "CommStats", "Engine", "ErrorFeedback", "FlatGroup", "GradientSync", "Segment", "memory_dtype", "plan_groups", "read_message", "reduce_named"]
