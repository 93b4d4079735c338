"""Publish text chunks onto sinkstream input streams (no torch, no GPU stack needed).

Library use::

    from producer import Producer, publish
    publish("standup", "ship it friday", speaker="Alice")          # default producer
    with Producer() as p:                                          # or your own
        p.publish_many("standup", [("hi", "Bob", 1.5), "no speaker"], eos=True)

The entry contract itself (``InputEntry``, ``parse_entry``) is ``sinkstream.contracts.entries``;
:func:`read_entries` reads a stream's input back, parsed.
"""

from producer.encoding import split_utf8
from producer.formats import FORMATS, InputFormatError, Turn, read_file
from producer.publisher import (
    Producer,
    PublishResult,
    StreamFullError,
    end_stream,
    publish,
    publish_many,
)
from producer.reader import read_entries
from sinkstream.contracts.entries import InputEntry, ParsedEntry, Rejected, parse_entry

__all__ = [
    "FORMATS",
    "InputEntry",
    "InputFormatError",
    "ParsedEntry",
    "Producer",
    "PublishResult",
    "Rejected",
    "StreamFullError",
    "Turn",
    "end_stream",
    "parse_entry",
    "publish",
    "publish_many",
    "read_entries",
    "read_file",
    "split_utf8",
]
