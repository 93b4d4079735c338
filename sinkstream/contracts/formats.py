"""Stored formats written by a newer build than this one.

Every stored format carries its version (a state's header, the log miner's and template
table's heads). A version this build does not know is one of two things:

* older than what it reads, or not a number at all: damage or a foreign writer, and the
  stream is parked as failed (``sinkstream status`` names the reason);
* **newer** than what it reads: a worker of a newer build has already committed this stream.
  Nothing is wrong with the data; this worker is the one out of date. It leaves the stream
  for an upgraded worker (the batch outcome ``deferred``) instead of parking it, so a rolling
  upgrade that changes a format loses nothing and leaves no failure to clear by hand.
"""

from __future__ import annotations


class NewerFormatError(Exception):
    """Stored data in a format ``version`` newer than this build reads (``newest``).

    A marker base beside each store's own error type (``StateTooNewError`` is also a
    ``StateFormatError``, the miner's and table's are their ``...StateError``), so a reader
    that only reports a store's errors still reports this one, and a worker tells it apart."""

    version: int = 0
    newest: int = 0

    def _newer(self, what: str, version: int, newest: int) -> str:
        """Record ``version`` and ``newest``; the message: what was found, what to do."""
        self.version, self.newest = version, newest
        return (f"{what} is format version {version}, newer than this build reads (up to "
                f"{newest}): a newer sinkstream wrote it; upgrade to read it")


def is_newer(version: object, newest: int) -> bool:
    """Whether a stored ``version`` field names a format after ``newest`` (an int above it;
    anything else is not a newer format but a wrong one)."""
    return isinstance(version, int) and not isinstance(version, bool) and version > newest
