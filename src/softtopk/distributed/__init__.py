"""Communication-efficient distributed training: compressed averaging with error feedback.

One core of three parts (a :class:`Compressor`, an :class:`ErrorFeedback` memory and a
:class:`Communicator`, joined by :class:`CompressedAllReduce`) and three adapters on it:
the DDP communication hook (:class:`DDPCompressionState`, :func:`ddp_compression_hook`),
the FSDP2 replica all-reduce hook of HSDP (:func:`register_fsdp_replica_hooks`) and the
outer step of local-SGD training (:class:`OuterStep`, DiLoCo and SparseLoCo).
"""

from ._compressor import (
    Compressor,
    Encoded,
    chunked_dct,
    chunked_idct,
    dequantize,
    quantize,
    randk_indices,
    topk_sparsify,
)
from ._core import Communicator, CompressedAllReduce, ErrorFeedback, Traffic
from ._ddp import DDPCompressionState, ddp_compression_hook
from ._fsdp import FSDPReplicaHook, register_fsdp_replica_hooks
from ._local_sgd import OuterStep

__all__ = [
    "Communicator",
    "CompressedAllReduce",
    "Compressor",
    "DDPCompressionState",
    "Encoded",
    "ErrorFeedback",
    "FSDPReplicaHook",
    "OuterStep",
    "Traffic",
    "chunked_dct",
    "chunked_idct",
    "ddp_compression_hook",
    "dequantize",
    "quantize",
    "randk_indices",
    "register_fsdp_replica_hooks",
    "topk_sparsify",
]
