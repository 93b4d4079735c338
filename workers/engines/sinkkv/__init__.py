"""StreamingLLM attention-sink KV cache for Hugging Face RoPE decoders (arXiv 2309.17453).

One concept per module, each importing only the ones above it:

* ``window``: the eviction policy (S sinks + R recent tokens), ``SinkWindow``;
* ``rotary``: re-rotating a stored key from its stored slot to its current one, ``SlotRotary``;
* ``families``: architecture adapters, where each family keeps its layers, attention, rotary,
  embeddings, norm and head, and the families refused with the piece they lack;
* ``support``: which models are served exactly, and a model's fingerprint;
* ``prompts``: the chat-template text that opens a stream and asks about it;
* ``state``: ``SinkKVState`` and its persistence as a ``StateSnapshot``;
* ``attention``: how a window reaches a transformers model's attention in one forward;
* ``decode``: the window of one ``generate`` call, built once and appended in place;
* ``engine``: ``SinkKVEngine``, the ``Engine`` API over all of the above;
* ``segments``: a state stored as fixed-size segments (bytes only, no store types).
"""

from workers.engines.sinkkv import segments
from workers.engines.sinkkv.attention import cache_keyword
from workers.engines.sinkkv.engine import SinkKVEngine
from workers.engines.sinkkv.prompts import TRANSCRIPT_INTRO
from workers.engines.sinkkv.rotary import ROPE_SCHEME, SlotRotary
from workers.engines.sinkkv.segments import EncodedSegments
from workers.engines.sinkkv.state import SinkKVState
from workers.engines.sinkkv.support import (
    SUPPORTED_ATTENTION,
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    SUPPORTED_TEXT,
    check_supported,
    model_fingerprint,
)
from workers.engines.sinkkv.window import SinkWindow

__all__ = [
    "ROPE_SCHEME",
    "SUPPORTED_ATTENTION",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "SUPPORTED_TEXT",
    "TRANSCRIPT_INTRO",
    "EncodedSegments",
    "SinkKVEngine",
    "SinkKVState",
    "SinkWindow",
    "SlotRotary",
    "cache_keyword",
    "check_supported",
    "model_fingerprint",
    "segments",
]
