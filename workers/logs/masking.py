"""What a log message's variables look like, masked before template mining.

Drain groups lines by their constant tokens; a variable it has not seen vary yet (an IP, a
block id, a duration) would split one event into many templates or, worse, look like a
constant. So every message is masked first, with one configuration for every system (no
per-system rules: logs of systems never seen here must group as well as these):

* identifiers: UUIDs, HDFS-style block ids (``blk_-123``), IPv4 addresses with an optional
  port, MAC addresses, ``0x`` hex numbers, file system paths;
* durations written with their unit (``12ms``, ``3.5s``, ``2h``); a unit after a space stays a
  word of its own (allowing it, ``3 seconds``, cost BGL 0.012 of accuracy);
* numbers, and with them any whitespace-separated token that still holds a digit
  (``core.2275``, ``003a90fc``, ``attempt_1445_0020_m_000000_0``, ``(uid=0)``): mixed tokens are
  ids far more often than words, and masking them whole keeps the id's shape from splitting the
  template (a separate pass for bare numbers first was slower and split more: 0.950 vs 0.954
  mean on LogHub);
* runs of padding dots (``instruction......0``) are cut to a space first, so the word before
  them stays a word;
* ``key=value`` pairs are split after the ``=`` first (``user= root``, ``rhost= <IP>``): the
  key is the constant, the value a token of its own that is masked, or compared as a word, on
  its own (LogHub Linux: 0.69 -> 0.75).

A message without a digit skips the masks that need one (most of them): same result, a few
times faster on word-only lines.

Masks are written ``<IP>``, ``<NUM>``...: equal masks count as equal tokens when Drain
compares a line with a template, so two lines differing only in masked values match fully.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from drain3.masking import LogMasker, MaskingInstruction

#: (pattern, mask name), applied in this order
MASKS: tuple[tuple[str, str], ...] = (
    (r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", "UUID"),
    (r"blk_-?\d+", "BLK"),
    (r"(?<![\w.])\d{1,3}(\.\d{1,3}){3}(:\d+)?(?![\w.])", "IP"),
    (r"(?<![\w])([0-9a-fA-F]{2}[:-]){5}[0-9a-fA-F]{2}(?!\w)", "MAC"),
    (r"(?<![\w])0[xX][0-9a-fA-F]+(?!\w)", "HEX"),
    (r"(?<![\w.])[-+]?\d+(\.\d+)?(ms|s|sec|secs|seconds|us|ns|min|mins|minutes|h|hours)"
     r"(?![\w])", "DUR"),
    (r"(?<![\w/.-])(/[\w.@~+-]+)+/?(?![\w/])", "PATH"),
    (r"(?<!\S)(?=\S*\d)\S+(?!\S)", "NUM"),
)
MASK_PREFIX = "<"
MASK_SUFFIX = ">"
_PADDING = re.compile(r"\.{2,}")
_KEY_VALUE = re.compile(r"(\w)=(\S)")
_DIGIT = re.compile(r"\d")
#: masks that can match text without a digit
_DIGITLESS = frozenset({"UUID", "MAC", "PATH"})


@dataclass(frozen=True)
class Masking:
    """A masking configuration; ``name`` goes into the miner's fingerprint, so a state mined
    under other masks is never continued with these."""

    masks: Sequence[tuple[str, str]] = MASKS
    name: str = "default-v3"

    def masker(self) -> Masker:
        return Masker(self)


class Masker:
    """Applies a :class:`Masking` to messages (compiled once per miner)."""

    def __init__(self, masking: Masking) -> None:
        self._masker = LogMasker([MaskingInstruction(p, name) for p, name in masking.masks],
                                 MASK_PREFIX, MASK_SUFFIX)
        self._wordy = LogMasker([MaskingInstruction(p, name) for p, name in masking.masks
                                 if name in _DIGITLESS], MASK_PREFIX, MASK_SUFFIX)

    def mask(self, message: str) -> str:
        text = _KEY_VALUE.sub(r"\1= \2", _PADDING.sub(" ", message))
        return (self._masker if _DIGIT.search(text) else self._wordy).mask(text)
