"""Sink-KV states as fixed-size segments, so a batch writes only what it added.

A sink-KV window holds stream tokens ``[0, S)`` (sinks) and ``[n - R, n)`` (recent), where n
counts the tokens processed so far (a multiple of ``chunk_tokens``: pending tokens are not in
the cache). Each cached token's key is stored exactly as the model produced it plus the slot
it was rotated at (see :mod:`workers.engines.sinkkv.rotary`), so a token's K, V and slot
never change once computed. That makes the window a set of immutable pieces:

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

This module is the engine side (it needs torch) and knows nothing of Redis: :func:`encode`
returns plain bytes (:class:`EncodedSegments`) and :func:`decode` takes them. The caller maps
them onto the store (``state_store.store``): the header is stored where a whole state goes,
each segment under its own key in the stream's hash tag, new ones staged before and evicted
ones deleted in the same fenced commit. Header and segments are each a codec envelope (own
digest, engine, fingerprint, params). ``workers/processing/states.py`` calls :func:`encode` and
:func:`decode`; ``benchmarks/state_io.py`` measures the I/O through the real commit path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import torch

from state_store.codec import (
    StateEnvelope,
    StateTooLargeError,
    check_compatible,
    decode_segments,
    decode_state,
    encode_state,
)
from state_store.tensors import DTYPE_SIZES, RawTensor, StateSnapshot
from workers.engines.base import StateMismatchError
from workers.engines.sinkkv.engine import SinkKVEngine
from workers.engines.sinkkv.state import SinkKVState
from workers.engines.sinkkv.window import SinkWindow
from workers.engines.tensor_bytes import dtype_name, to_raw, torch_dtype

LAYOUT = "sinkkv-segments/v1"


@dataclass(frozen=True)
class EncodedSegments:
    """The bytes one commit of a segmented state writes, free of any store type.

    ``header``: the encoded header envelope (stored where a whole state would go);
    ``keep``: every segment id of the new window, sorted (stored ones outside it are deleted);
    ``write``: the encoded envelope of each segment in ``keep`` not stored yet.
    """

    header: bytes
    keep: tuple[int, ...]
    write: dict[int, bytes]


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


@dataclass(frozen=True)
class _Geometry:
    """What a window's layout depends on: from the engine, or from a stored header."""

    sink: int
    recent: int
    chunk: int

    @classmethod
    def of(cls, engine: SinkKVEngine) -> _Geometry:
        return cls(engine.window.sink, engine.window.recent, engine.chunk_tokens)

    @property
    def window(self) -> SinkWindow:
        return SinkWindow(self.sink, self.recent)

    def positions(self, processed: int) -> torch.Tensor:
        """Stream position of every cache index: int64 ``[L]`` (``SinkWindow.positions``)."""
        return self.window.positions(processed)

    def segment_ids(self, processed: int) -> list[int]:
        """Sorted ids of the segments the window overlaps: each kept run ``[a, b)`` of stream
        positions overlaps segments ``a // C .. (b - 1) // C``."""
        ids: set[int] = set()
        for a, b in self.window.kept(processed):
            if b > a:
                ids.update(range(a // self.chunk, (b - 1) // self.chunk + 1))
        return sorted(ids)

    def span(self, processed: int, seg: int) -> tuple[int, list[tuple[int, int]]]:
        """Where segment ``seg`` sits in the window after ``processed`` tokens: its first
        cache index and its runs of stream positions ``[a, b)``, in order. Cache indices
        follow stream positions in order, so a segment (an interval of positions) is one run
        of cache indices: the first index, then as many as the runs hold."""
        lo, hi = seg * self.chunk, (seg + 1) * self.chunk
        first: int | None = None
        index = 0
        runs: list[tuple[int, int]] = []
        for a, b in self.window.kept(processed):
            start, stop = max(a, lo), min(b, hi)
            if start < stop:
                if first is None:
                    first = index + start - a
                runs.append((start, stop))
            index += b - a
        if first is None:
            raise ValueError(f"segment {seg} is not in the window")
        return first, runs


def positions(engine: SinkKVEngine, processed: int) -> torch.Tensor:
    """Stream position of every cache index of a state that has processed ``processed``."""
    return _Geometry.of(engine).positions(processed)


def segment_ids(engine: SinkKVEngine, processed: int) -> list[int]:
    """Sorted ids of the segments overlapping the window after ``processed`` tokens."""
    return _Geometry.of(engine).segment_ids(processed)


def _view(raw: RawTensor) -> torch.Tensor:
    """A read-only view of a segment's bytes, no copy: segments are only sliced and
    concatenated (one copy), never written in place."""
    dtype = torch_dtype(raw.dtype)
    if not raw.data:
        return torch.empty(raw.shape, dtype=dtype)
    return _frombuffer(raw.data).view(dtype).reshape(raw.shape)


_read_only_warned = False


def _frombuffer(data: bytes) -> torch.Tensor:
    """``torch.frombuffer`` of read-only bytes. Torch warns that the bytes are not writable
    (by design here) once per process (``TORCH_WARN_ONCE``): that first call runs with the
    warning silenced; the others skip ``catch_warnings``, which cost more than the view (a
    window of 17 segments takes ~120 views per load)."""
    global _read_only_warned
    if _read_only_warned:
        return torch.frombuffer(data, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    _read_only_warned = True
    return flat


def _raw_view(tensor: torch.Tensor) -> RawTensor:
    """``tensor``'s bytes as a RawTensor without a copy: a writable memoryview, which keeps
    the tensor alive and which ``import_state`` (``from_raw``) takes over as the state's own
    memory, so pass only a tensor nothing else holds (``join``'s concatenations)."""
    t = tensor.contiguous()
    data = t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b""
    return RawTensor(dtype_name(t.dtype), tuple(t.shape), cast(bytes, data))


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
            # K/V geometry, so an empty window can be rebuilt without the engine
            "kv": [engine.kv_heads, engine.head_dim, dtype_name(engine.storage_dtype)],
        },
    )


def segment_of(engine: SinkKVEngine, state: SinkKVState, seg: int) -> StateSnapshot:
    """Segment ``seg`` cut from ``state`` (its tokens the state still holds): one run of
    cache indices (``_Geometry.span``), so each tensor is a slice, copied once."""
    first, runs = _Geometry.of(engine).span(_processed(state), seg)
    n = sum(b - a for a, b in runs)
    pos = torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in runs])  # [n]
    tensors: dict[str, RawTensor] = {
        "pos": to_raw(pos),
        "slots": to_raw(state.slots.narrow(0, first, n)),
    }
    for layer, (k, v) in enumerate(zip(state.keys, state.values, strict=True)):
        tensors[f"keys.{layer}"] = to_raw(k.narrow(1, first, n))
        tensors[f"values.{layer}"] = to_raw(v.narrow(1, first, n))
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
    return engine.import_state(join(header, segments))


def join(header: StateSnapshot, segments: Mapping[int, StateSnapshot]) -> StateSnapshot:
    """The whole-layout snapshot (what ``export_state`` gives) of a segmented state, without
    an engine: the window geometry comes from the header. Raises StateMismatchError when the
    segments do not cover the window exactly; ``import_state`` checks the rest."""
    sc = header.scalars
    geo, layers, kv, processed = _header_window(sc, segments)
    names = {"pos", "slots"} | {
        f"{kind}.{layer}" for kind in ("keys", "values") for layer in range(layers)
    }
    parts: dict[str, list[torch.Tensor]] = {}
    for g in geo.segment_ids(processed):
        for name, part in _kept_parts(g, segments[g], names, geo, processed).items():
            parts.setdefault(name, []).append(part)
    got = torch.cat(parts["pos"]) if parts else torch.zeros(0, dtype=torch.long)
    if not torch.equal(got, geo.positions(processed)):
        raise StateMismatchError("segments do not cover the window exactly")
    try:
        tensors = {
            name: _raw_view(torch.cat(ts, dim=1 if "." in name else 0))
            for name, ts in parts.items()
        }
    except RuntimeError as exc:  # segments of different shapes or dtypes
        raise StateMismatchError(f"segments do not fit together: {exc}") from None
    tensors.pop("pos", None)
    if not parts:  # an empty stream: no segments at all
        heads, dim, dtype = kv
        empty = RawTensor(dtype, (heads, 0, dim), b"")  # [H_kv, 0, D]
        tensors = {"slots": RawTensor("int64", (0,), b"")}
        tensors |= {f"{kind}.{layer}": empty for kind in ("keys", "values")
                    for layer in range(layers)}
    tensors["last_hidden"] = header.tensors["last_hidden"]
    scalars = {k: v for k, v in sc.items() if k not in ("layout", "segments", "kv")}
    return StateSnapshot(tensors=tensors, scalars=scalars)


def _header_window(
    sc: Mapping[str, object], segments: Mapping[int, StateSnapshot]
) -> tuple[_Geometry, int, tuple[int, int, str], int]:
    """Geometry, layer count, K/V geometry and tokens processed of a segmented header, checked
    against the segment ids at hand: exactly the ones its window needs."""
    if sc.get("layout") != LAYOUT:
        raise StateMismatchError(f"state layout {sc.get('layout')!r}, expected {LAYOUT!r}")
    geo, layers, kv = _header_geometry(sc)
    seen, pending = sc.get("tokens_seen"), sc.get("pending")
    if not isinstance(seen, int) or not isinstance(pending, list):
        raise StateMismatchError("segmented state header lacks tokens_seen/pending")
    processed = seen - len(pending)
    if processed < 0 or processed % geo.chunk:
        raise StateMismatchError(f"segmented header: {seen} seen, {len(pending)} pending")
    want = geo.segment_ids(processed)
    listed = sc.get("segments")
    if not isinstance(listed, list) or listed != want or sorted(segments) != want:
        raise StateMismatchError(
            f"segmented state lists segments {sc.get('segments')!r} and holds "
            f"{sorted(segments)}; its window needs {want}"
        )
    return geo, layers, kv, processed


def _kept_parts(
    g: int, seg: StateSnapshot, names: set[str], geo: _Geometry, processed: int
) -> dict[str, torch.Tensor]:
    """Segment ``g``'s tensors cut to the tokens the window still keeps (views where the kept
    tokens are one run): K/V ``[H_kv, k, D]``, ``slots`` and ``pos`` ``[k]``."""
    if set(seg.tensors) != names:
        raise StateMismatchError(
            f"segment {g} holds tensors {sorted(seg.tensors)[:4]}..., not this model's"
        )
    pos = _view(seg.tensors["pos"]).to(torch.long)  # [n_g]
    if pos.dim() != 1:
        raise StateMismatchError(f"segment {g}: positions are not a vector")
    cut = _stored_run(pos, geo, processed, g) or _kept_index(pos, geo, processed)
    parts: dict[str, torch.Tensor] = {}
    for name, raw in seg.tensors.items():
        t = _view(raw)
        dim = 1 if name.startswith(("keys.", "values.")) else 0
        if t.dim() <= dim or t.shape[dim] != pos.shape[0]:
            raise StateMismatchError(f"segment {g}: tensor {name} has shape {raw.shape}")
        # kept tokens of a segment are almost always one run: a view, no gather
        parts[name] = t.narrow(dim, *cut) if isinstance(cut, tuple) \
            else t.index_select(dim, cut)
    return parts


def _kept_index(pos: torch.Tensor, geo: _Geometry, processed: int
                ) -> tuple[int, int] | torch.Tensor:
    """What the window keeps of stored positions ``pos``, compared one by one: ``(first,
    count)`` when it is one run, else the indices ``[k]``. The window is ``[0, S)`` and
    ``[processed - R, processed)``: a comparison, not a set lookup."""
    kept = (pos < geo.sink) | (pos >= processed - geo.recent)
    index = torch.nonzero(kept & (pos < processed)).flatten()  # [k]
    if not index.numel():
        return 0, 0
    lo, n = int(index[0]), index.numel()
    return (lo, n) if int(index[-1]) - lo + 1 == n else index


def _stored_run(pos: torch.Tensor, geo: _Geometry, processed: int, g: int
                ) -> tuple[int, int] | None:
    """``(first index, count)`` in segment ``g``'s stored tokens of what the window keeps of
    it, when the segment is one run of positions ``pos[0] ..`` and it keeps one run of them
    (as a segment is written, and as the window keeps it, but in a corner of segment 0);
    None otherwise: the caller then compares every position. Not a check of ``pos``: the
    caller's ``join`` compares the positions taken with the window's."""
    if not pos.numel():
        return None
    p0, n_g = int(pos[0]), pos.shape[0]
    if int(pos[-1]) - p0 + 1 != n_g:
        return None
    try:
        _, runs = geo.span(processed, g)
    except ValueError:
        return None
    if len(runs) != 1:
        return None
    a, b = runs[0]
    lo = a - p0
    return (lo, b - a) if 0 <= lo and b - p0 <= n_g else None


def _header_geometry(sc: Mapping[str, object]) -> tuple[_Geometry, int, tuple[int, int, str]]:
    params, kv = sc.get("params"), sc.get("kv")
    if not isinstance(params, dict):
        raise StateMismatchError("segmented state header lacks params")
    sink, recent, chunk, layers = (
        _count(params.get("sink_tokens")), _count(params.get("recent_tokens")),
        _count(params.get("chunk_tokens")), _count(sc.get("layers")),
    )
    if sink is None or recent is None or chunk is None or layers is None:
        raise StateMismatchError(f"segmented state header has a bad window {params!r}")
    if chunk < 1 or recent < chunk:
        raise StateMismatchError(f"segmented state header: recent {recent} < chunk {chunk}")
    if not (isinstance(kv, list) and len(kv) == 3 and kv[2] in DTYPE_SIZES):
        raise StateMismatchError(f"segmented state header has a bad kv geometry {kv!r}")
    heads, dim = _count(kv[0]), _count(kv[1])
    if heads is None or dim is None:
        raise StateMismatchError(f"segmented state header has a bad kv geometry {kv!r}")
    return _Geometry(sink, recent, chunk), layers, (heads, dim, str(kv[2]))


def _count(value: object) -> int | None:
    """``value`` if it is a non-negative int (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


# ----- bytes: what the processor commits and loads ---------------------------------------------
def supports(engine: object) -> bool:
    """True when ``engine`` can store its states as segments (sink-KV, R >= chunk)."""
    return isinstance(engine, SinkKVEngine) and engine.window.recent >= engine.chunk_tokens


def is_segmented(envelope: StateEnvelope) -> bool:
    """True when a decoded envelope is the header of a segmented state."""
    return envelope.snapshot.scalars.get("layout") == LAYOUT


def _wrap(
    engine: SinkKVEngine, snapshot: StateSnapshot, tokens_seen: int, last_entry_id: str | None
) -> StateEnvelope:
    return StateEnvelope(
        engine=engine.kind, fingerprint=engine.fingerprint, params=engine.params,
        tokens_seen=tokens_seen, last_entry_id=last_entry_id, snapshot=snapshot,
    )


def encode(
    engine: SinkKVEngine,
    state: SinkKVState,
    stored: Iterable[int],
    last_entry_id: str | None,
    *,
    max_bytes: int | None = None,
    checksum: str = "blake2b",
) -> EncodedSegments:
    """The header bytes and the segments that turn stored segments ``stored`` into ``state``:
    only segments not stored yet are encoded (the bytes a commit writes), each sealed with
    the ``checksum`` digest (``state_store.codec.encode_state``)."""
    if max_bytes is not None and engine.state_nbytes(state) > max_bytes:
        raise StateTooLargeError(
            f"state is {engine.state_nbytes(state)} bytes of tensors, limit is {max_bytes}"
        )
    p = plan(engine, state, stored)
    header = encode_state(_wrap(engine, p.header, state.tokens_seen, last_entry_id),
                          max_bytes=max_bytes, checksum=checksum)
    write = {
        g: encode_state(_wrap(engine, seg, state.tokens_seen, None), max_bytes=max_bytes,
                        checksum=checksum)
        for g, seg in p.write.items()
    }
    return EncodedSegments(header=header, keep=tuple(p.keep), write=write)


def decode(
    engine: SinkKVEngine,
    header: StateEnvelope,
    segments: Mapping[int, bytes],
    *,
    stream_id: str | None = None,
    max_bytes: int | None = None,
) -> SinkKVState:
    """Rebuild a state from its decoded (and compatibility-checked) header envelope and the
    segments' bytes. Each segment is decoded and checked on its own, so a corrupt or foreign
    one is refused by name (:class:`state_store.codec.StateError`); ``assemble`` then checks
    that they cover the window exactly (:class:`StateMismatchError`)."""
    total = sum(len(b) for b in segments.values())
    if max_bytes is not None and total > max_bytes:
        raise StateTooLargeError(
            f"segments hold {total} bytes, limit is {max_bytes}", stream_id=stream_id
        )
    pieces: dict[int, StateSnapshot] = {}
    envelopes = decode_segments(segments, stream_id=stream_id, threads=torch.get_num_threads(),
                                **({} if max_bytes is None else {"max_bytes": max_bytes}))
    for g, env in envelopes.items():
        check_compatible(env, engine.kind, engine.fingerprint, engine.params,
                         stream_id=stream_id)
        if env.snapshot.scalars.get("segment") != g:
            raise StateMismatchError(
                f"segment key {g} holds segment {env.snapshot.scalars.get('segment')!r}"
            )
        pieces[g] = env.snapshot
    return assemble(engine, header.snapshot, pieces)


def whole_snapshot(
    data: bytes, segments: Mapping[int, bytes], *, stream_id: str | None = None
) -> StateSnapshot:
    """The whole-layout snapshot (``export_state`` form) of a stored state of either layout,
    without an engine: for tests and tools that compare committed states."""
    envelope = decode_state(data, stream_id=stream_id)
    if not is_segmented(envelope):
        return envelope.snapshot
    pieces = {g: env.snapshot for g, env in decode_segments(segments, stream_id=stream_id).items()}
    joined = join(envelope.snapshot, pieces)
    return StateSnapshot(
        tensors={k: RawTensor(t.dtype, t.shape, bytes(t.data)) for k, t in joined.tensors.items()},
        scalars=joined.scalars,
    )
