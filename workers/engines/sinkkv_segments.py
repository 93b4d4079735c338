"""Sink-KV states as fixed-size segments, so a batch writes only what it added.

A sink-KV window holds stream tokens ``[0, S)`` (sinks) and ``[n - R, n)`` (recent), where n
counts the tokens processed so far (a multiple of ``chunk_tokens``: pending tokens are not in
the cache). Each cached token's key is stored exactly as the model produced it plus the slot
it was rotated at (see :mod:`workers.engines.sinkkv`), so a token's K, V and slot never change
once computed. That makes the window a set of immutable pieces:

* segment g holds the cached tokens with stream position in ``[g*C, (g+1)*C)`` (C =
  ``chunk_tokens``): per layer K and V ``[H_kv, n_g, D]``, their ``slots`` and stream
  positions ``pos`` (int64 ``[n_g]``), as present in the state when the segment was written.
  Chunks are processed whole, so a segment is only ever written after its chunk completed,
  and the window only moves forward: the tokens a later state keeps from segment g are a
  subset of what was written. Segment 0 (the sinks) is kept for the life of the stream.
* the header holds the rest: ``last_hidden`` ``[E]``, ``tokens_seen``, ``pending``, identity,
  and the ids of the segments that make up the window.

Per batch, :func:`plan` returns the new segments to write and the ids to delete; bytes written
are proportional to the new tokens (plus the header), not to the window. :func:`assemble`
rebuilds a state bit-identical to the one split (the engine re-rotates from stored slots as
usual), so whole and segmented layouts continue a stream identically.

This module is the engine side only. The Redis side (segment keys under the stream's hash
tag, written and deleted in the same fenced commit as the header) is not wired into
``state_store.store`` yet; ``benchmarks/state_io.py`` measures the I/O of the layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from state_store.tensors import RawTensor, StateSnapshot
from workers.engines.base import StateMismatchError
from workers.engines.sinkkv import SinkKVEngine, SinkKVState
from workers.engines.tensor_bytes import from_raw, to_raw

LAYOUT = "sinkkv-segments/v1"


@dataclass(frozen=True)
class SegmentPlan:
    """What one commit of a segmented state changes."""

    header: StateSnapshot
    write: dict[int, StateSnapshot]  # segments not stored yet
    delete: list[int]  # stored segments no longer in the window
    keep: list[int]  # every segment id of the new window (sorted)

    @property
    def nbytes_written(self) -> int:
        return self.header.nbytes + sum(s.nbytes for s in self.write.values())


def _processed(state: SinkKVState) -> int:
    return state.tokens_seen - len(state.pending)


def positions(engine: SinkKVEngine, processed: int) -> torch.Tensor:
    """Stream position of every cache index of a state that has processed ``processed``."""
    w = engine.window
    if processed <= w.capacity:
        return torch.arange(processed, dtype=torch.long)
    return torch.cat(
        [
            torch.arange(w.sink, dtype=torch.long),
            torch.arange(processed - w.recent, processed, dtype=torch.long),
        ]
    )


def segment_ids(engine: SinkKVEngine, processed: int) -> list[int]:
    """Sorted ids of the segments overlapping the window after ``processed`` tokens."""
    pos = positions(engine, processed)
    return sorted({int(p) for p in torch.unique(pos // engine.chunk_tokens)})


def _check_engine(engine: SinkKVEngine) -> None:
    if engine.window.recent < engine.chunk_tokens:
        raise ValueError(
            f"segmented states need recent_tokens ({engine.window.recent}) >= chunk_tokens "
            f"({engine.chunk_tokens}): a chunk must be whole in the window when written"
        )


def header_of(engine: SinkKVEngine, state: SinkKVState) -> StateSnapshot:
    hidden = state.last_hidden
    processed = _processed(state)
    return StateSnapshot(
        tensors={
            "last_hidden": to_raw(
                hidden if hidden is not None else torch.zeros(0, dtype=engine.compute_dtype)
            )
        },
        scalars={
            "layout": LAYOUT,
            "tokens_seen": int(state.tokens_seen),
            "pending": [int(t) for t in state.pending],
            "layers": engine.n_layers,
            "fingerprint": engine.fingerprint,
            "params": engine.params,
            "segments": segment_ids(engine, processed),
        },
    )


def segment_of(engine: SinkKVEngine, state: SinkKVState, seg: int) -> StateSnapshot:
    """Segment ``seg`` cut from ``state`` (its tokens the state still holds)."""
    pos = positions(engine, _processed(state))
    index = torch.nonzero(pos // engine.chunk_tokens == seg).flatten()
    if index.numel() == 0:
        raise ValueError(f"segment {seg} is not in the window")
    tensors: dict[str, RawTensor] = {
        "pos": to_raw(pos.index_select(0, index)),
        "slots": to_raw(state.slots.index_select(0, index.to(state.slots.device))),
    }
    for layer, (k, v) in enumerate(zip(state.keys, state.values, strict=True)):
        dev_index = index.to(k.device)
        tensors[f"keys.{layer}"] = to_raw(k.index_select(1, dev_index).contiguous())
        tensors[f"values.{layer}"] = to_raw(v.index_select(1, dev_index).contiguous())
    return StateSnapshot(tensors=tensors, scalars={"segment": seg})


def plan(engine: SinkKVEngine, state: SinkKVState, stored: Iterable[int] = ()) -> SegmentPlan:
    """The commit that turns stored segments ``stored`` into ``state``'s window."""
    _check_engine(engine)
    header = header_of(engine, state)
    keep = segment_ids(engine, _processed(state))
    have = set(stored)
    return SegmentPlan(
        header=header,
        write={g: segment_of(engine, state, g) for g in keep if g not in have},
        delete=sorted(have - set(keep)),
        keep=keep,
    )


def assemble(
    engine: SinkKVEngine, header: StateSnapshot, segments: Mapping[int, StateSnapshot]
) -> SinkKVState:
    """Rebuild the state from its header and segments; validated by ``import_state``."""
    _check_engine(engine)
    sc = header.scalars
    if sc.get("layout") != LAYOUT:
        raise StateMismatchError(f"state layout {sc.get('layout')!r}, expected {LAYOUT!r}")
    seen, pending = sc.get("tokens_seen"), sc.get("pending")
    if not isinstance(seen, int) or not isinstance(pending, list):
        raise StateMismatchError("segmented state header lacks tokens_seen/pending")
    processed = seen - len(pending)
    if processed < 0 or processed % engine.chunk_tokens:
        raise StateMismatchError(f"segmented header: {seen} seen, {len(pending)} pending")
    want = segment_ids(engine, processed)
    listed = sc.get("segments")
    if not isinstance(listed, list) or listed != want or sorted(segments) != want:
        raise StateMismatchError(
            f"segmented state lists segments {sc.get('segments')!r} and holds "
            f"{sorted(segments)}; its window needs {want}"
        )
    kept_pos = positions(engine, processed)
    parts: dict[str, list[torch.Tensor]] = {}
    for g in want:
        seg = segments[g]
        pos = from_raw(seg.tensors["pos"]).to(torch.long)
        index = torch.nonzero(torch.isin(pos, kept_pos)).flatten()
        lo, n = (int(index[0]), index.numel()) if index.numel() else (0, 0)
        contiguous = n == 0 or int(index[-1]) - lo + 1 == n
        for name, raw in seg.tensors.items():
            t = from_raw(raw)
            dim = 1 if name.startswith(("keys.", "values.")) else 0
            # kept tokens of a segment are almost always one run: a view, no gather
            part = t.narrow(dim, lo, n) if contiguous else t.index_select(dim, index)
            parts.setdefault(name, []).append(part)
    got = torch.cat(parts["pos"]) if parts else torch.zeros(0, dtype=torch.long)
    if not torch.equal(got, kept_pos):
        raise StateMismatchError("segments do not cover the window exactly")
    tensors = {
        name: to_raw(torch.cat(ts, dim=1 if "." in name else 0)) for name, ts in parts.items()
    }
    tensors.pop("pos", None)
    if not parts:  # an empty stream: no segments at all
        empty = engine.export_state(engine.new_state()).tensors
        tensors = {k: v for k, v in empty.items() if k != "last_hidden"}
    tensors["last_hidden"] = header.tensors["last_hidden"]
    scalars = {k: v for k, v in sc.items() if k not in ("layout", "segments")}
    return engine.import_state(StateSnapshot(tensors=tensors, scalars=scalars))
