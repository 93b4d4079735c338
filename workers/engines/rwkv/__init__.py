"""RWKV engine: a stream's memory is the model's recurrent state, constant in size.

One concept per module, each importing only the ones above it:

* ``package``: the ``rwkv`` pip package as a process-wide resource (RWKV_V7_ON, its module
  globals, one model configuration per process, strategies), ``RWKVConfigError``;
* ``checkpoint``: what a ``.pth`` checkpoint is (generation, dimensions, fingerprint);
* ``tokenizer``: the RWKV world tokenizer shipped in the package, ``world_tokenizer``;
* ``prompts``: the RWKV world chat format that asks a model about its stream;
* ``state``: ``RWKVState``, the package's state layout, and its persistence as a
  ``StateSnapshot``;
* ``batched``: a batched RWKV-7 forward for CPU over the package's loaded weights;
* ``tiny``: seeded tiny random RWKV-7/RWKV-6 checkpoints for tests and benchmarks;
* ``engine``: ``RWKVEngine``, the ``Engine`` API over all of the above.
"""

from workers.engines.rwkv.engine import RWKVEngine
from workers.engines.rwkv.package import RWKVConfigError, rwkv_strategy
from workers.engines.rwkv.state import STATE_FORMAT, RWKVState
from workers.engines.rwkv.tiny import write_tiny_rwkv
from workers.engines.rwkv.tokenizer import WorldTokenizer, world_tokenizer

__all__ = [
    "STATE_FORMAT",
    "RWKVConfigError",
    "RWKVEngine",
    "RWKVState",
    "WorldTokenizer",
    "rwkv_strategy",
    "world_tokenizer",
    "write_tiny_rwkv",
]
