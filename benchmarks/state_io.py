"""State I/O per batch through the real ``StateStore.commit`` path: whole vs segments layout.

A stream with a full, shifted sink-KV window (S=4, R=1020, 64-token chunks) gets batches of
one new chunk each, the steady state of a live stream. After every batch each layout commits
the new state exactly as ``workers/processor.py`` does, into a private ``redis-server`` on
loopback, under a real lease and fencing token (``StateStore.commit``: chunk/segment staging,
the fenced Lua commit, pending-set bookkeeping), then loads it back as a worker with a cold
hot cache does (``StateStore.head`` + ``load``: hash and segments in one round trip, decode,
``import_state`` / reassembly; checked bit-identical to the state in memory):

* ``whole``: the state encoded as one envelope (``state_store.codec``), stored in
  ``state_chunk_bytes`` (4 MiB) chunks, the previous version's chunks deleted;
* ``segments``: ``state_layout = "segments"`` (``workers/engines/sinkkv/segments.py``): the
  header (envelope with the segment list) plus only the segments not stored yet; the
  evicted ones are deleted by the same commit.

Per layout: bytes per batch and per new token (encoded bytes the commit carries, and the
bytes Redis received over the socket, ``INFO stats total_net_input_bytes``, protocol
included), seconds per batch of encode+commit (write) and of head+load+decode (read, what a
hot-cache miss costs); fastest of the batches (medians in the JSON). The layouts alternate
which goes first each batch. ``kv_bytes_per_token`` = K+V bytes of one token over all layers;
target ``bytes_per_token_incremental`` <= 1.5 x that plus a small per-batch constant.

States are sealed with the ``state_checksum`` digest (``SINKSTREAM_STATE_CHECKSUM``, blake2b
by default; xxh3 is the faster alternative, named in the title).

Full: SmolLM2-135M fp32 when converted (30 layers x 3 KV heads x 64: 46 KB per token), else
the mid-size tiny Llama; quick: the mid-size tiny Llama, fewer batches.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    bench_settings,
    load_smollm2,
    median,
    mid_tiny_llama,
    smollm2_ready,
    threads,
)
from benchmarks.run import BenchResult

SINKS, RECENT, CHUNK = 4, 1020, 64
LAYOUTS = ("whole", "segments")


class _Layout:
    """One stream committed and loaded in one layout, like ``StreamProcessor`` does."""

    def __init__(self, name: str, engine: Any, store: Any, lease: Any,
                 checksum: str = "blake2b") -> None:
        self.name, self.engine, self.store, self.lease = name, engine, store, lease
        self.checksum = checksum  # ``state_checksum``: the digest each state is sealed with
        self.sid = f"stateio-{name}"
        self.version = 0
        self.segments: list[int] = []
        self.rec: dict[str, list[float]] = {k: [] for k in ("bytes", "net", "write", "read")}

    def commit(self, state: Any, entry: str) -> tuple[int, float]:
        """Encode + commit; returns (encoded bytes written, seconds)."""
        from state_store.codec import StateEnvelope, encode_state
        from state_store.store import CommitRequest, SegmentUpdate
        from workers.engines.sinkkv import segments as sinkkv_segments

        started = time.perf_counter()
        update: SegmentUpdate | None
        if self.name == "segments":
            encoded = sinkkv_segments.encode(self.engine, state, self.segments, entry,
                                             checksum=self.checksum)
            payload = encoded.header
            update = SegmentUpdate(keep=encoded.keep, write=encoded.write)
        else:
            e = self.engine
            payload, update = encode_state(StateEnvelope(
                e.kind, e.fingerprint, e.params, state.tokens_seen, entry,
                e.export_state(state)), checksum=self.checksum), None
        result = self.store.commit(CommitRequest(self.sid, self.lease.token, self.version, entry,
                                                 state=payload, segments=update))
        elapsed = time.perf_counter() - started
        self.version = result.version
        self.segments = list(update.keep) if update is not None else []
        return len(payload) + result.segment_bytes, elapsed

    def load(self) -> tuple[Any, float]:
        """Head + load + decode, as a worker whose hot cache missed."""
        from state_store.codec import decode_state
        from workers.engines.sinkkv import segments as sinkkv_segments

        started = time.perf_counter()
        stored = self.store.load(self.sid, self.store.head(self.sid))
        assert stored is not None
        envelope = decode_state(stored.data, stream_id=self.sid)
        if sinkkv_segments.is_segmented(envelope):
            state = sinkkv_segments.decode(self.engine, envelope, stored.segments,
                                           stream_id=self.sid)
        else:
            state = self.engine.import_state(envelope.snapshot)
        return state, time.perf_counter() - started


def _net_in(client: Any) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


def run(quick: bool) -> BenchResult:
    import redis
    import torch

    from sinkstream.cli.localredis import RedisServer
    from state_store.lease import LeaseManager
    from state_store.store import StateStore
    from workers.engines.sinkkv import SinkKVEngine

    settings = bench_settings()
    if not quick and smollm2_ready(settings):
        model, tokenizer, _ = load_smollm2(settings, prepare=False)
        vocab, label = int(model.config.vocab_size), "SmolLM2-135M-Instruct fp32"
    else:
        from workers.engines.tokenizers import ByteTokenizer

        model, tokenizer = mid_tiny_llama(), ByteTokenizer()
        vocab, label = 256, "mid-size tiny Llama (4x256) fp32"
    engine = SinkKVEngine(model, tokenizer, model_name="bench", sink_tokens=SINKS,
                          recent_tokens=RECENT, chunk_tokens=CHUNK)
    rng = random.Random(0)
    state = engine.feed(
        engine.new_state(), [rng.randrange(vocab) for _ in range(SINKS + RECENT + CHUNK)]
    )
    batches = 4 if quick else 12
    kv_bytes_per_token = (
        2 * engine.n_layers * engine.kv_heads * engine.head_dim * engine.storage_dtype.itemsize
    )

    workdir = Path(tempfile.mkdtemp(prefix="stateio-"))
    server = RedisServer(workdir / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        store = StateStore(client, chunk_bytes=settings.state_chunk_bytes)
        leases = LeaseManager(client)
        layouts = []
        for name in LAYOUTS:
            lease = leases.acquire(f"stateio-{name}", "bench", 3600)
            assert lease is not None
            layout = _Layout(name, engine, store, lease, settings.state_checksum)
            layout.commit(state, "1-0")  # the stored state before the timed batches
            layouts.append(layout)
        for b in range(batches):
            state = engine.feed(state, [rng.randrange(vocab) for _ in range(CHUNK)])
            entry = f"{b + 2}-0"
            for layout in layouts if b % 2 == 0 else layouts[::-1]:
                net = _net_in(client)
                nbytes, write_s = layout.commit(state, entry)
                layout.rec["net"].append(_net_in(client) - net)
                back, read_s = layout.load()
                layout.rec["bytes"].append(nbytes)
                layout.rec["write"].append(write_s)
                layout.rec["read"].append(read_s)
                assert back.tokens_seen == state.tokens_seen
                assert torch.equal(back.slots, state.slots)
                for x, y in zip([*back.keys, *back.values], [*state.keys, *state.values],
                                strict=True):
                    assert torch.equal(x, y), layout.name
        keys_left = {
            name: sum(1 for _ in client.scan_iter(match=f"sinkstream:{{stateio-{name}}}:*"))
            for name in LAYOUTS
        }
    finally:
        server.stop()

    rows: list[dict[str, Any]] = []
    for layout in layouts:
        rec = layout.rec
        written = median(rec["bytes"])
        rows.append({
            "layout": layout.name,
            "bytes_per_batch": written,
            "bytes_per_new_token": written / CHUNK,
            "x_kv_bytes_per_token": written / CHUNK / kv_bytes_per_token,
            "redis_in_per_token": median(rec["net"]) / CHUNK,
            "write_ms": 1000 * min(rec["write"]),
            "read_ms": 1000 * min(rec["read"]),
            "io_ms_per_batch": 1000 * (min(rec["write"]) + min(rec["read"])),
        })
    whole, seg = rows
    return BenchResult(
        title=f"state I/O per {CHUNK}-token batch through StateStore.commit, full window "
        f"S={SINKS} R={RECENT}, {label}, {batches} batches, {threads()} threads, "
        f"{settings.state_checksum} digests",
        rows=rows,
        summary={
            "bytes_per_token_incremental": seg["bytes_per_new_token"],
            "bytes_per_token_whole": whole["bytes_per_new_token"],
            "kv_bytes_per_token": kv_bytes_per_token,
            "incremental_vs_kv": seg["bytes_per_new_token"] / kv_bytes_per_token,
            "redis_in_bytes_per_token_incremental": seg["redis_in_per_token"],
            "state_write_s_per_batch_whole": whole["write_ms"] / 1000,
            "state_write_s_per_batch_incremental": seg["write_ms"] / 1000,
            "state_read_s_per_batch_whole": whole["read_ms"] / 1000,
            "state_read_s_per_batch_incremental": seg["read_ms"] / 1000,
            "write_speedup": whole["write_ms"] / seg["write_ms"],
            "model": label,
        },
        extra={
            "median_ms": {
                f"{layout.name}_{k}": 1000 * median(layout.rec[k])
                for layout in layouts for k in ("write", "read")
            },
            "per_batch": {layout.name: layout.rec for layout in layouts},
            "keys_left": keys_left,
        },
    )
