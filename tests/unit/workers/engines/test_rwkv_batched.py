"""The batched RWKV-7 CPU forward against the ``rwkv`` package's own forward (fp32)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tests.unit.workers.engines.test_rwkv import _same
from workers.engines.rwkv import RWKVEngine, RWKVState
from workers.engines.rwkv.batched import batched_forward, supported

CHUNK = 16
ATOL = 1e-5


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> RWKVEngine:
    return RWKVEngine.tiny(tmp_path_factory.mktemp("rwkvb"), seed=3, chunk_tokens=CHUNK)


def _close(a: RWKVState, b: RWKVState) -> None:
    """Many chunks apart: fp32 rounding accumulates in wkv states of magnitude ~10, so the
    bound is 1e-5 relative or absolute (one forward alone is held to 1e-5 absolute above)."""
    assert (a.tokens_seen, a.pending) == (b.tokens_seen, b.pending)
    assert a.logits is not None and b.logits is not None
    for x, y in zip([*a.tensors, a.logits], [*b.tensors, b.logits], strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("T", [1, 2, CHUNK])
def test_batched_forward_matches_package_forward(engine: RWKVEngine, T: int) -> None:
    assert supported(engine._model)
    states = [engine.feed(engine.new_state(), _tokens(CHUNK * (b + 1), b)) for b in range(5)]
    before = [[t.clone() for t in s.tensors] for s in states]
    rows = [_tokens(T, 100 + b) for b in range(5)]
    logits, new = batched_forward(engine._model, rows, [s.tensors for s in states])
    assert logits.shape == (5, engine.vocab_size)
    for b, s in enumerate(states):
        ref_logits, ref_state = engine._forward(rows[b], s.tensors)
        torch.testing.assert_close(logits[b], ref_logits, rtol=0, atol=ATOL)
        for x, y in zip(new[b], ref_state, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=ATOL)
        # inputs untouched, outputs are not views of a shared batch buffer
        assert all(torch.equal(x, y) for x, y in zip(s.tensors, before[b], strict=True))
        assert all(x._base is None for x in new[b])


def test_feed_batch_long_streams_equal_solo_feeds_bit_for_bit(engine: RWKVEngine) -> None:
    """Many rounds, ragged chunk counts and pending remainders; fresh and fed streams: a row
    rounds the same whatever its neighbours, so batched and solo states are identical."""
    starts = [engine.new_state()] + [
        engine.feed(engine.new_state(), _tokens(7 * b + 3, 10 + b)) for b in range(6)
    ]
    news = [_tokens(n, 20 + i) for i, n in enumerate([0, 5, 16, 33, 64, 100, 130])]
    states = starts
    solos = list(starts)
    for step in range(3):
        states = engine.feed_batch(states, news)
        solos = [engine.feed(s, t) for s, t in zip(solos, news, strict=True)]
        news = [_tokens(len(t) + step, 40 + i) for i, t in enumerate(news)]
    for a, b in zip(states, solos, strict=True):
        assert _same(a, b)


def test_single_stream_feed_takes_the_batched_forward(engine: RWKVEngine) -> None:
    """feed() runs the batched forward with one row, chunk by chunk (so a lone stream rounds
    like a batched one), and stays within float rounding of the package's forward."""
    s = engine.new_state()
    toks = _tokens(3 * CHUNK + 5, 7)
    a = engine.feed_batch([s], [toks])[0]
    tensors = list(s.tensors)
    for i in range(0, 3 * CHUNK, CHUNK):
        logits, (tensors,) = batched_forward(engine._model, [toks[i : i + CHUNK]], [tensors])
    assert a.logits is not None and torch.equal(a.logits, logits[0])
    assert all(torch.equal(x, y) for x, y in zip(a.tensors, tensors, strict=True))
    _close(a, engine._feed_one(s, toks))


def test_batched_rounds_skip_the_package_forward(
    engine: RWKVEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds with several rows run one batched forward, never the per-stream package call."""
    calls: list[int] = []
    real = engine._forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", counting)
    out = engine.feed_batch(
        [engine.new_state() for _ in range(8)], [_tokens(2 * CHUNK, i) for i in range(8)]
    )
    assert len(out) == 8 and calls == []
