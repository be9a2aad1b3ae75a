"""deepreduce: compressed gradient communication for distributed PyTorch.

Gradients (DDP hook, Horovod, mpi4py) or parameter updates (:class:`UpdateSync`) are
sparsified, their indices and values are encoded by pluggable codecs into one
self-describing payload, all-gathered and decoded by one per-step engine
(:mod:`deepreduce.engine`).

    import deepreduce as dr
    c = dr.Compressor(ratio=0.01, sparsifier="topk", index="eliasfano", value="fp16")
    payload = c.compress(grad)
    sg = dr.decode(payload)            # SparseGrad(indices, values, numel)
"""

from .codecs import index_codecs, value_codecs
from .comm.torch_dist import close_process_group
from .compressor import Compressed, Compressor, decode
from .errors import CommunicationError, ConfigError, DecodeError, DeepReduceError, NonFiniteError
from .engine.plan import AutoPlan
from .hooks import DeepReduceState, deepreduce_hook
from .local_adam import LocalAdamW
from .optim import DensityFollowsLR, UpdateSync
from .sparse import SparseGrad
from .sparsifiers import sparsifiers, sparsify
from .wire import read_header

__version__ = "0.1.0"

__all__ = [
    "AutoPlan",
    "CommunicationError",
    "Compressed",
    "Compressor",
    "ConfigError",
    "DecodeError",
    "DeepReduceState",
    "DeepReduceError",
    "DensityFollowsLR",
    "LocalAdamW",
    "NonFiniteError",
    "SparseGrad",
    "UpdateSync",
    "close_process_group",
    "decode",
    "deepreduce_hook",
    "index_codecs",
    "read_header",
    "sparsifiers",
    "sparsify",
    "value_codecs",
]
