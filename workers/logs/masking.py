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

No mask matches across whitespace and every lookaround sees one character, which at a token's
edge is whitespace or nothing alike, so masking a message is masking each of its whitespace
tokens: the masker remembers what each token became (tokens repeat: words, levels, keys) and
a line costs a split, a few dictionary lookups and a join. A token without a digit skips the
masks that need one. Drain splits on whitespace, so the joined line mines exactly as the
line masked whole did (``tests/unit/workers/logs/test_masking.py`` checks it on LogHub).

Masks are written ``<IP>``, ``<NUM>``...: equal masks count as equal tokens when Drain
compares a line with a template, so two lines differing only in masked values match fully.
"""

from __future__ import annotations

import functools
import re
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
#: per default mask: characters one of which every match of it holds, and whether every match
#: holds a digit. No mask's replacement (``<UUID>``... upper case and brackets) brings in a
#: character a later mask looks for, so a token lacking them lacks them to the end.
_HINTS: dict[str, tuple[frozenset[str] | None, bool]] = {
    "UUID": (frozenset("-"), False),
    "BLK": (frozenset("_"), True),
    "IP": (frozenset("."), True),
    "MAC": (frozenset(":-"), False),
    "HEX": (frozenset("xX"), True),
    "DUR": (frozenset("msunh"), True),  # the first letters of the units
    "PATH": (frozenset("/"), False),
    "NUM": (None, True),
}


def _split_key_value(match: re.Match[str]) -> str:
    """``k=v`` -> ``k= v``: a function, not the template ``\\1= \\2``, which Python 3.11
    expands in Python for every match (2.5x slower on a Linux auth line)."""
    return match[1] + "= " + match[2]


@dataclass(frozen=True)
class Masking:
    """A masking configuration; ``name`` goes into the miner's fingerprint, so a state mined
    under other masks is never continued with these."""

    masks: tuple[tuple[str, str], ...] = MASKS
    name: str = "default-v3"

    def masker(self) -> Masker:
        """This configuration's masker, one per process: masking is a pure function of the
        configuration, so every miner (one per batch, decoded from its stream's state) shares
        the tokens it has already masked."""
        return _shared_masker(self)


#: tokens a masker remembers before it starts over (a bound, not a tuning knob: the result
#: is the same at any size)
TOKEN_MEMORY = 1 << 16


@functools.cache
def _shared_masker(masking: Masking) -> Masker:
    return Masker(masking)


class Masker:
    """Applies a :class:`Masking` to messages: compiled once, and shared by every miner of the
    process through :meth:`Masking.masker`."""

    def __init__(self, masking: Masking, token_memory: int = TOKEN_MEMORY) -> None:
        self._memory = token_memory
        self._masker = LogMasker([MaskingInstruction(p, name) for p, name in masking.masks],
                                 MASK_PREFIX, MASK_SUFFIX)
        self._wordy = LogMasker([MaskingInstruction(p, name) for p, name in masking.masks
                                 if name in _DIGITLESS], MASK_PREFIX, MASK_SUFFIX)
        self._seen: dict[str, str] = {}
        hints = _HINTS if masking.masks == MASKS else {}
        self._steps = [(re.compile(pattern), MASK_PREFIX + name + MASK_SUFFIX,
                        *hints.get(name, (None, False))) for pattern, name in masking.masks]

    def mask(self, message: str) -> str:
        """``message`` masked, its tokens joined by single spaces."""
        text = _PADDING.sub(" ", message) if ".." in message else message
        if "=" in text:
            text = _KEY_VALUE.sub(_split_key_value, text)
        seen = self._seen
        out = []
        for token in text.split():
            masked = seen.get(token)
            if masked is None:
                masked = self.mask_token(token)
                if len(seen) >= self._memory:
                    seen.clear()
                seen[token] = masked
            out.append(masked)
        return " ".join(out)

    def mask_token(self, token: str) -> str:
        """One whitespace-free ``token`` masked as :meth:`mask_whole` masks it, running only
        the masks whose necessary characters it holds (``_HINTS``, default masks only): a new
        token cost ~5 us of eight regex passes, and a 2,000-line sample holds ~10,000 (IPs,
        block ids, numbers are new on most lines)."""
        present = set(token)
        digit = _DIGIT.search(token) is not None
        for regex, mask, chars, needs_digit in self._steps:
            if (needs_digit and not digit) or (chars is not None and present.isdisjoint(chars)):
                continue
            token = regex.sub(mask, token)
        return token

    def mask_whole(self, text: str) -> str:
        """``text`` masked in one piece, every mask over the whole string (the reference
        that token-wise masking equals)."""
        return (self._masker if _DIGIT.search(text) else self._wordy).mask(text)
