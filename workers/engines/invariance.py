"""Whether a stream fed in a batch commits the same bits as the stream fed alone, on this machine.

Cross-stream batching is only safe to turn on by default if it is *batch-invariant*: a stream's
state after a batch must not depend on which other streams shared the forward, so that a
stream fed in batches and replayed alone after a crash (or by another worker, with other
neighbours) commits a bit-identical state. The engines are written for it:

* every feed, a lone stream's included, goes through the same batched code (the sink-KV engine
  attends row group by row group with one function; RWKV-7 runs its batched forward with one
  row), and every op in it is row-wise;
* except the matmuls, whose rows the BLAS must round alike for ``B * T`` rows as for ``T``:
  true on the CPUs measured here (MKL/oneDNN, fp32 and bf16, 1 and 2 threads, for ``T >= 64``
  rows; not for a single row, which takes a matrix-vector kernel, so logits are made row by
  row), but a property of the kernels, not of our code. (Families batched through the padded
  path, their attention computed inline, depend on them more: on an AVX-512 Xeon, MPT and
  BLOOM rows in fp32 with 8-token chunks round with their neighbours' padding; at the default
  64 they do not, and on an AVX2 EPYC neither does.)

So the worker does not assume it: ``check_batch_invariance`` feeds a few synthetic streams
(empty, partial, past eviction) through a scaled-down copy of the engine (same model, forward,
dtype and chunk size; a two-chunk window so eviction happens early), once alone and twice in
batches with different neighbours and row orders, and compares the exported states byte for
byte. A family whose design rules invariance out (mixture of experts) is refused without
running anything (``Engine.batch_variance``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from state_store.tensors import StateSnapshot
from workers.engines.base import Engine


@dataclass(frozen=True)
class InvarianceCheck:
    """The outcome of one check: ``invariant``, and in words what was compared or differed."""

    invariant: bool
    reason: str
    seconds: float


def check_batch_invariance(engine: Engine[Any], seed: int = 0) -> InvarianceCheck:
    """Feed synthetic streams alone and in two differently composed batches; invariant when
    every stream's exported state is identical in all three."""
    started = time.perf_counter()
    designed = engine.batch_variance()
    if designed is not None:
        return InvarianceCheck(False, designed, time.perf_counter() - started)
    probe = engine.scaled_down()
    c = probe.chunk_tokens
    vocab = _vocab(probe)
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    # fed before the check: nothing, a partial window, one past its eviction (the scaled-down
    # window holds S + 2c); then a chunk each, the first stream's with a pending remainder
    histories = [tokens(n) for n in (0, c, 3 * c)]
    news = [tokens(n) for n in (c + 1, c, c)]
    starts = [probe.feed(probe.new_state(), h) for h in histories]
    alone = [_snapshot(probe, probe.feed(s, t)) for s, t in zip(starts, news, strict=True)]
    together = probe.feed_batch(starts, news)
    # other neighbours (a fresh stream) and the rows in another order
    extra = tokens(c)
    order = [2, 0, 1]
    regrouped = probe.feed_batch([probe.new_state(), *[starts[i] for i in order]],
                                 [extra, *[news[i] for i in order]])[1:]
    for label, fed in (("in one batch", together),
                       ("with other neighbours", [regrouped[order.index(i)] for i in range(3)])):
        for i, state in enumerate(fed):
            if _snapshot(probe, state) != alone[i]:
                return InvarianceCheck(
                    False,
                    f"stream {i} fed {label} differs from it fed alone (the BLAS or attention "
                    "kernels round a row differently with other rows beside it)",
                    time.perf_counter() - started)
    return InvarianceCheck(
        True, f"3 streams (empty, partial, past eviction) in {c}-token chunks: identical "
        "states alone and in two batches", time.perf_counter() - started)


def _vocab(engine: Engine[Any]) -> int:
    size = getattr(engine, "vocab_size", None)
    return min(int(size), 256) if size else 256


def _snapshot(engine: Engine[Any], state: Any) -> StateSnapshot:
    """A state as a commit would store it (raw tensor bytes and scalars: equality is bitwise)."""
    return engine.export_state(state)

