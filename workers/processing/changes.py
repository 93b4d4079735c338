"""What a batch commits beside its state: the stream's memory, vocab and logs hashes, and how
far its applied input is trimmed."""

from __future__ import annotations

from dataclasses import dataclass

from sinkstream.contracts.keys import StreamKeys
from state_store.store import FieldValue, HashUpdate
from workers.memory.records import MemoryWrite
from workers.processing.log_batches import LogUpdate


@dataclass(frozen=True)
class Changes:
    """What a batch changes beside the state: its stream's memory hash (memory records and
    notes), its vocab and its logs hash, committed with it."""

    memory: MemoryWrite | None
    notes: dict[str, bytes | int]
    vocab: dict[str, int]
    #: the logs hash fields (miner, table, retention, applied) of a stream with log lines
    logs: dict[str, bytes | str] | None = None
    #: the batch's logs update: which first-format fields go, where the input is trimmed
    log_update: LogUpdate | None = None

    @property
    def trim(self) -> bool:
        """Whether the applied input may be trimmed (a log stream keeping its last lines
        trims nothing until it holds more than it keeps)."""
        return self.log_update is None or self.log_update.trim

    @property
    def trim_before(self) -> str | None:
        """The first input entry kept; None: trim all that is applied."""
        return self.log_update.trim_before if self.log_update is not None else None

    def updates(self, keys: StreamKeys) -> list[HashUpdate]:
        memory_set: dict[str, FieldValue] = {**(self.memory.set if self.memory else {}),
                                             **self.notes}
        memory_delete = list(self.memory.delete) if self.memory else []
        delete = self.log_update.delete if self.log_update is not None else ()
        out = []
        if memory_set or memory_delete:
            out.append(HashUpdate(keys.memory, memory_set, memory_delete))
        if self.vocab:
            out.append(HashUpdate(keys.vocab, dict(self.vocab)))
        if self.logs or delete:
            out.append(HashUpdate(keys.logs, dict(self.logs or {}), delete))
        return out
