"""A sink-KV state's export and import (``workers/engines/sinkkv/state.py``): through raw
tensors and the msgpack envelope it continues bit for bit, and it is refused by an engine or
model it does not belong to, or with tensors of the wrong shape."""

from __future__ import annotations

import pytest
import torch

from state_store.tensors import RawTensor, StateSnapshot
from tests.unit.workers.engines.test_sinkkv import (
    _through_bytes,
    assert_states_equal,
    make_engine,
    stream,
)
from workers.engines.base import StateMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- export -> raw tensors (-> msgpack envelope) -> import continues identically ----------


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_export_import_continues_bit_identically(storage: str) -> None:
    engine = make_engine(storage_dtype=storage)
    state = engine.feed(engine.new_state(), stream(77))  # past eviction, 5 pending
    assert state.keys[0].dtype == getattr(torch, storage)
    restored = engine.import_state(_through_bytes(engine, engine.export_state(state)))
    assert_states_equal(restored, state)
    more = stream(50, seed=9)
    assert_states_equal(engine.feed(restored, more), engine.feed(state, more))
    assert engine.generate(restored, [1, 2, 3], 12) == engine.generate(state, [1, 2, 3], 12)
    assert engine.state_nbytes(state) == engine.export_state(state).nbytes
    empty = engine.import_state(_through_bytes(engine, engine.export_state(engine.new_state())))
    assert_states_equal(empty, engine.new_state())


# ----- mismatches: another engine or model, bad tensors ----------------------------------------


def test_import_into_another_engine_or_model_is_refused() -> None:
    engine = make_engine(recent_tokens=24)
    snap = engine.export_state(engine.feed(engine.new_state(), stream(50)))
    with pytest.raises(StateMismatchError, match="recent_tokens: state 24 vs engine 16"):
        make_engine(recent_tokens=16).import_state(snap)
    with pytest.raises(StateMismatchError, match="sink_tokens"):
        make_engine(sink_tokens=2).import_state(snap)
    with pytest.raises(StateMismatchError, match="storage_dtype"):
        make_engine(storage_dtype="bfloat16").import_state(snap)
    with pytest.raises(StateMismatchError, match="fingerprint"):
        make_engine(seed=1).import_state(snap)
    assert make_engine(seed=1).fingerprint != engine.fingerprint
    assert make_engine().fingerprint == engine.fingerprint


def test_import_validates_tensors() -> None:
    engine = make_engine()
    snap = engine.export_state(engine.feed(engine.new_state(), stream(50)))
    bad_shape = dict(snap.tensors)
    k = snap.tensors["keys.1"]
    bad_shape["keys.1"] = RawTensor(
        k.dtype, (k.shape[0], k.shape[1] - 1, k.shape[2]), k.data[: -k.nbytes // k.shape[1]]
    )
    with pytest.raises(StateMismatchError, match="keys.1 has shape"):
        engine.import_state(StateSnapshot(bad_shape, snap.scalars))
    missing = {n: t for n, t in snap.tensors.items() if n != "values.0"}
    with pytest.raises(StateMismatchError, match="missing \\['values.0'\\]"):
        engine.import_state(StateSnapshot(missing, snap.scalars))
    with pytest.raises(StateMismatchError, match="pending"):
        engine.import_state(StateSnapshot(snap.tensors, {**snap.scalars, "tokens_seen": 51}))
