"""Segmented sink-KV states: identical continuations, and writes proportional to new tokens."""

from __future__ import annotations

import random

import pytest
import torch

from state_store.tensors import RawTensor, StateSnapshot
from workers.engines.base import StateMismatchError
from workers.engines.sinkkv import SinkKVEngine, SinkKVState
from workers.engines.sinkkv.segments import assemble, plan
from workers.engines.tiny import tiny_hf_model
from workers.engines.tokenizers import ByteTokenizer

CHUNK = 16


def _engine(sink: int = 4, recent: int = 60) -> SinkKVEngine:
    return SinkKVEngine(
        tiny_hf_model("llama", 0),
        ByteTokenizer(),
        model_name="tiny-llama:0",
        sink_tokens=sink,
        recent_tokens=recent,
        chunk_tokens=CHUNK,
    )


def _bytes_roundtrip(snap: StateSnapshot) -> StateSnapshot:
    return StateSnapshot(
        tensors={
            k: RawTensor(v.dtype, tuple(v.shape), bytes(v.data)) for k, v in snap.tensors.items()
        },
        scalars=dict(snap.scalars),
    )


def _equal(a: SinkKVState, b: SinkKVState) -> None:
    assert (a.tokens_seen, a.pending) == (b.tokens_seen, b.pending)
    assert torch.equal(a.slots, b.slots)
    for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values], strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert (a.last_hidden is None) == (b.last_hidden is None)
    if a.last_hidden is not None and b.last_hidden is not None:
        assert torch.equal(a.last_hidden, b.last_hidden)


@pytest.mark.parametrize(("sink", "recent"), [(4, 60), (0, 16), (20, 45)])
def test_segments_rebuild_the_state_and_continue_identically(sink: int, recent: int) -> None:
    engine = _engine(sink, recent)
    rng = random.Random(sink + recent)
    kv_per_token = 2 * engine.n_layers * engine.kv_heads * engine.head_dim * 4
    state = engine.new_state()
    stored: dict[int, StateSnapshot] = {}  # what Redis would hold
    header = plan(engine, state).header
    for _ in range(14):
        n = rng.choice([0, 3, CHUNK - 1, CHUNK, 2 * CHUNK + 5, 5 * CHUNK])
        before = state.tokens_seen - len(state.pending)
        state = engine.feed(state, [rng.randrange(256) for _ in range(n)])
        p = plan(engine, state, stored)
        for g in p.delete:
            del stored[g]
        stored.update({g: _bytes_roundtrip(s) for g, s in p.write.items()})
        header = _bytes_roundtrip(p.header)
        assert sorted(stored) == p.keep
        # bytes written: the new tokens' K/V (+ pos/slot ints) and a small header, never the window
        new = state.tokens_seen - len(state.pending) - before
        assert p.nbytes_written <= (kv_per_token + 16) * new + p.header.nbytes
        rebuilt = assemble(engine, header, stored)
        _equal(rebuilt, state)
    # whole and segmented layouts continue identically
    whole = engine.import_state(_bytes_roundtrip(engine.export_state(state)))
    seg = assemble(engine, header, stored)
    more = [rng.randrange(256) for _ in range(3 * CHUNK + 7)]
    _equal(engine.feed(whole, more), engine.feed(seg, more))
    assert engine.generate(whole, [65, 66], 12) == engine.generate(seg, [65, 66], 12)
    assert engine.score(whole, more[:9]) == engine.score(seg, more[:9])


def test_empty_stream_and_missing_segment() -> None:
    engine = _engine()
    p = plan(engine, engine.new_state())
    assert p.write == {} and p.keep == []
    _equal(assemble(engine, p.header, {}), engine.new_state())
    state = engine.feed(engine.new_state(), list(range(5 * CHUNK)))
    p = plan(engine, state)
    segs = dict(p.write)
    segs.pop(p.keep[-1])
    with pytest.raises(StateMismatchError):
        assemble(engine, p.header, segs)


def test_recent_shorter_than_a_chunk_is_refused() -> None:
    engine = _engine(4, CHUNK - 1)
    with pytest.raises(ValueError, match="recent_tokens"):
        plan(engine, engine.new_state())


def test_encoded_segments_round_trip_and_damage_is_refused_by_name() -> None:
    from state_store.codec import ForeignStateError, StateCorruptError, decode_state
    from workers.engines.sinkkv.segments import decode, encode, is_segmented, supports

    engine = _engine()
    assert supports(engine) and not supports(_engine(4, CHUNK - 1))
    state = engine.feed(engine.new_state(), list(range(7 * CHUNK + 3)))
    first = encode(engine, state, [], "5-0")
    assert sorted(first.write) == list(first.keep)
    env = decode_state(first.header, stream_id="s")
    assert is_segmented(env) and env.last_entry_id == "5-0"
    _equal(decode(engine, env, dict(first.write), stream_id="s"), state)

    # only segments not stored yet are encoded
    more = engine.feed(state, list(range(2 * CHUNK)))
    second = encode(engine, more, first.keep, "6-0")
    assert set(second.write) == set(second.keep) - set(first.keep) and len(second.write) == 2
    stored = {g: second.write.get(g) or first.write[g] for g in second.keep}
    _equal(decode(engine, decode_state(second.header), stored), more)

    g = second.keep[-1]
    damaged = dict(stored)
    damaged[g] = stored[g][:-1] + bytes([stored[g][-1] ^ 1])
    with pytest.raises(StateCorruptError, match=rf"stream 's': segment {g}: state checksum"):
        decode(engine, decode_state(second.header), damaged, stream_id="s")
    swapped = dict(stored)
    swapped[g] = stored[second.keep[-2]]
    with pytest.raises(StateMismatchError, match=rf"segment key {g} holds segment"):
        decode(engine, decode_state(second.header), swapped, stream_id="s")
    other = _engine(4, 2 * CHUNK)  # same model, other window: its segments are foreign
    foreign = encode(other, other.feed(other.new_state(), list(range(9 * CHUNK))), [], None)
    with pytest.raises(ForeignStateError, match="params.recent_tokens"):
        decode(engine, decode_state(second.header), {**stored, g: foreign.write[g]},
               stream_id="s")


def test_encoded_segments_are_plain_bytes() -> None:
    """``encode`` returns store-neutral bytes: a frozen header, sorted ids and segment bytes."""
    import dataclasses

    from workers.engines.sinkkv.segments import EncodedSegments, encode, segment_ids

    engine = _engine()
    state = engine.feed(engine.new_state(), list(range(6 * CHUNK)))
    enc = encode(engine, state, [0], None)
    assert isinstance(enc, EncodedSegments) and isinstance(enc.header, bytes)
    assert enc.keep == tuple(segment_ids(engine, 6 * CHUNK)) and 0 not in enc.write
    assert all(isinstance(b, bytes) for b in enc.write.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        enc.header = b""  # type: ignore[misc]
