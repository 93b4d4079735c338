"""A stream's committed state as an engine state: the hot cache, the codec and both layouts.

``load`` gives the state a batch starts from: the cached object when its version is still the
committed one (nobody committed in between, so it *is* the committed state), else the bytes
from Redis, decoded and checked (a foreign model, other engine parameters or a damaged state
is refused by name, never silently reset). ``encode`` gives the bytes a commit writes: the whole
envelope, or (``state_layout = "segments"``, sink-KV) a small header plus only the segments not
stored yet. Either layout loads whatever the setting says, so switching needs no migration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sinkstream.settings import Settings
from state_store.codec import StateEnvelope, check_compatible, decode_state, encode_state
from state_store.store import SegmentUpdate, StateHead, StateReadError, StateStore, StoredState
from workers.engines.base import Engine, EngineState
from workers.engines.sinkkv import segments
from workers.processing.hot_cache import HotStateCache
from workers.processing.observer import BatchObserver


@dataclass
class Loaded:
    """The state a batch starts from, and where it came from."""

    state: EngineState
    version: int
    last_entry_id: str | None
    cache_hit: bool
    #: ids of the segments stored for this version (segmented states; [] when whole)
    segments: list[int] = field(default_factory=list)


class StateRepository:
    """Loads and encodes one worker's stream states (one engine, one store, one cache)."""

    def __init__(self, engine: Engine[Any], store: StateStore, settings: Settings,
                 cache: HotStateCache[tuple[EngineState, str | None]],
                 observer: BatchObserver) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.cache = cache
        self.observer = observer

    def load(self, stream_id: str, head: StateHead) -> Loaded:
        """The committed state at ``head`` (read at the start of the batch)."""
        cached = self.cache.get(stream_id, head.version)
        if cached is not None:
            self.observer.state_loaded(hit=True)
            return Loaded(cached[0], head.version, cached[1], cache_hit=True,
                          segments=head.segment_ids)
        if head.version == 0:  # a new stream: nothing to load, neither a hit nor a miss
            return Loaded(self.engine.new_state(), 0, None, cache_hit=False)
        started = time.perf_counter()
        stored = self.store.load(stream_id, head)  # hash + segments: one round trip
        if stored is None:
            return Loaded(self.engine.new_state(), 0, None, cache_hit=False)
        state = self.decode(stream_id, stored)
        self.observer.state_loaded(
            hit=False, nbytes=len(stored.data) + sum(len(b) for b in stored.segments.values()),
            seconds=time.perf_counter() - started)
        return Loaded(state, stored.version, stored.last_entry_id, cache_hit=False,
                      segments=sorted(stored.segments))

    def committed(self, stream_id: str) -> Loaded:
        """The latest committed state, for read-only use (no lease: it is never written)."""
        return self.load(stream_id, self.store.head(stream_id))

    def decode(self, stream_id: str, stored: StoredState) -> EngineState:
        """A stored state of either layout as an engine state; refuses foreign or damaged
        states (and segments) by name."""
        envelope = decode_state(
            stored.data, stream_id=stream_id, max_bytes=self.settings.max_state_bytes
        )
        check_compatible(
            envelope, self.engine.kind, self.engine.fingerprint, self.engine.params,
            stream_id=stream_id,
        )
        if not segments.is_segmented(envelope):
            if stored.segments:
                raise StateReadError(f"stream {stream_id!r}: a whole state with "
                                     f"{len(stored.segments)} segment keys")
            return self.engine.import_state(envelope.snapshot)
        if not segments.supports(self.engine):
            raise StateReadError(f"stream {stream_id!r}: segmented state, engine "
                                 f"{self.engine.kind} cannot read it")
        return segments.decode(
            self.engine, envelope, stored.segments,  # type: ignore[arg-type]
            stream_id=stream_id, max_bytes=self.settings.max_state_bytes,
        )

    def encode(self, loaded: Loaded, new_state: EngineState, last_entry_id: str,
               ) -> tuple[bytes, SegmentUpdate | None]:
        """The bytes a commit writes: the whole envelope, or the segmented header plus a
        ``SegmentUpdate`` naming the window's segments and carrying the new ones."""
        if self.settings.state_layout == "segments" and segments.supports(self.engine):
            encoded = segments.encode(
                self.engine, new_state, loaded.segments, last_entry_id,  # type: ignore[arg-type]
                max_bytes=self.settings.max_state_bytes, checksum=self.settings.state_checksum,
            )
            return encoded.header, SegmentUpdate(keep=encoded.keep, write=encoded.write)
        return encode_state(
            StateEnvelope(
                engine=self.engine.kind, fingerprint=self.engine.fingerprint,
                params=self.engine.params, tokens_seen=new_state.tokens_seen,
                last_entry_id=last_entry_id, snapshot=self.engine.export_state(new_state),
            ),
            max_bytes=self.settings.max_state_bytes, checksum=self.settings.state_checksum,
        ), None

    def remember(self, stream_id: str, version: int, state: EngineState,
                 last_entry_id: str | None) -> None:
        """Keep a just-committed state for the next batch of its stream."""
        self.cache.put(stream_id, version, (state, last_entry_id),
                       self.engine.state_nbytes(state))
        self.observer.cache_changed(self.cache.nbytes, self.cache.limit_bytes)

    def forget(self, stream_id: str) -> None:
        self.cache.discard(stream_id)
