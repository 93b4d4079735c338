"""State I/O per batch: the whole sink-KV window vs incremental segments, through real Redis.

A stream with a full, shifted window (S=4, R=1020, 64-token chunks) gets batches of one new
chunk each, the steady state of a live stream. After every batch both layouts persist the new
state to a private ``redis-server`` on loopback and read it back:

* ``whole``: today's format: the state encoded as one envelope (``state_store.codec``), one
  value written (``SET``) and read (``GET``) per batch (the store's chunking of big values
  splits the same bytes over several keys: same volume);
* ``segments``: :mod:`workers.engines.sinkkv_segments`: only the new segments and the header
  are written, evicted segments deleted, in one ``MULTI``; a load reads the header and every
  segment of the window (``MGET``) and reassembles the state (checked bit-identical).

Per layout: bytes written per batch and per new token, and seconds per batch of encode+write
and of read+decode (the fastest of the batches; medians in the JSON). The fenced commit script
does not yet carry segment keys (see the module docstring), so this measures the layout's
I/O, not the production commit path. ``kv_bytes_per_token`` = K+V bytes of one token over all
layers; target ``bytes_per_token_incremental`` <= 1.5 x that plus a small per-batch constant.

Full: SmolLM2-135M fp32 when converted (30 layers x 3 KV heads x 64: 46 KB per token), else
the mid-size tiny Llama; quick: the mid-size tiny Llama, fewer batches.
"""

from __future__ import annotations

import random
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, cast

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


def _envelope(engine: Any, snap: Any) -> Any:
    from state_store.codec import StateEnvelope

    return StateEnvelope(
        engine=engine.kind,
        fingerprint=engine.fingerprint,
        params=engine.params,
        tokens_seen=int(snap.scalars.get("tokens_seen", 0)),
        last_entry_id=None,
        snapshot=snap,
    )


def _get(r: Any, key: str) -> bytes:
    data = r.get(key)
    assert isinstance(data, bytes), key
    return data


def run(quick: bool) -> BenchResult:
    import redis
    import torch

    from sinkstream.localredis import RedisServer
    from state_store.codec import decode_state, encode_state
    from workers.engines import sinkkv_segments as segs
    from workers.engines.sinkkv import SinkKVEngine

    settings = bench_settings()
    if not quick and smollm2_ready(settings):
        model, tokenizer, _ = load_smollm2(settings, prepare=False)
        vocab, label = int(model.config.vocab_size), "SmolLM2-135M-Instruct fp32"
    else:
        from workers.engines.tokenizers import ByteTokenizer

        model, tokenizer = mid_tiny_llama(), ByteTokenizer()
        vocab, label = 256, "mid-size tiny Llama (4x256) fp32"
    engine = SinkKVEngine(
        model,
        tokenizer,
        model_name="bench",
        sink_tokens=SINKS,
        recent_tokens=RECENT,
        chunk_tokens=CHUNK,
    )
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
        r = redis.Redis.from_url(server.url)
        sid = "{stateio}"
        stored: list[int] = []
        # the segmented layout starts from the same stored state (one full write, not counted)
        first = segs.plan(engine, state, stored)
        r.mset(
            {f"{sid}:seg:{g}": encode_state(_envelope(engine, s)) for g, s in first.write.items()}
        )
        r.set(f"{sid}:hdr", encode_state(_envelope(engine, first.header)))
        stored = first.keep
        rec: dict[str, list[float]] = {
            k: []
            for k in (
                "whole_bytes",
                "whole_write",
                "whole_read",
                "seg_bytes",
                "seg_write",
                "seg_read",
                "zlib_ratio",
                "zlib_s",
            )
        }
        for _ in range(batches):
            state = engine.feed(state, [rng.randrange(vocab) for _ in range(CHUNK)])

            t0 = time.perf_counter()
            blob = encode_state(_envelope(engine, engine.export_state(state)))
            r.set(f"{sid}:whole", blob)
            t1 = time.perf_counter()
            back = engine.import_state(decode_state(_get(r, f"{sid}:whole")).snapshot)
            t2 = time.perf_counter()
            rec["whole_bytes"].append(len(blob))
            rec["whole_write"].append(t1 - t0)
            rec["whole_read"].append(t2 - t1)
            assert torch.equal(back.keys[0], state.keys[0])

            t0 = time.perf_counter()
            p = segs.plan(engine, state, stored)
            payload = {
                f"{sid}:seg:{g}": encode_state(_envelope(engine, s)) for g, s in p.write.items()
            }
            payload[f"{sid}:hdr"] = encode_state(_envelope(engine, p.header))
            pipe = r.pipeline(transaction=True)
            pipe.mset(payload)
            if p.delete:
                pipe.delete(*[f"{sid}:seg:{g}" for g in p.delete])
            pipe.execute()
            stored = p.keep
            t1 = time.perf_counter()
            header = decode_state(_get(r, f"{sid}:hdr")).snapshot
            ids = [int(g) for g in header.scalars["segments"]]  # type: ignore[attr-defined]
            raws = [cast(bytes, b) for b in r.mget([f"{sid}:seg:{g}" for g in ids])]
            pieces = {g: decode_state(b).snapshot for g, b in zip(ids, raws, strict=True)}
            rebuilt = segs.assemble(engine, header, pieces)
            t2 = time.perf_counter()
            rec["seg_bytes"].append(sum(len(v) for v in payload.values()))
            rec["seg_write"].append(t1 - t0)
            rec["seg_read"].append(t2 - t1)
            assert torch.equal(rebuilt.keys[-1], state.keys[-1])
            assert torch.equal(rebuilt.slots, state.slots)

            t0 = time.perf_counter()
            packed = zlib.compress(blob, 1)
            rec["zlib_s"].append(time.perf_counter() - t0)
            rec["zlib_ratio"].append(len(blob) / len(packed))
    finally:
        server.stop()

    rows: list[dict[str, Any]] = []
    for name, key in (("whole", "whole"), ("segments", "seg")):
        written = median(rec[f"{key}_bytes"])
        rows.append(
            {
                "layout": name,
                "bytes_per_batch": written,
                "bytes_per_new_token": written / CHUNK,
                "x_kv_bytes_per_token": written / CHUNK / kv_bytes_per_token,
                "write_ms": 1000 * min(rec[f"{key}_write"]),
                "read_ms": 1000 * min(rec[f"{key}_read"]),
            }
        )
    return BenchResult(
        title=f"state I/O per {CHUNK}-token batch, full window S={SINKS} R={RECENT}, {label}, "
        f"{batches} batches, {threads()} threads",
        rows=rows,
        summary={
            "bytes_per_token_incremental": rows[1]["bytes_per_new_token"],
            "bytes_per_token_whole": rows[0]["bytes_per_new_token"],
            "kv_bytes_per_token": kv_bytes_per_token,
            "incremental_vs_kv": rows[1]["bytes_per_new_token"] / kv_bytes_per_token,
            "write_speedup": rows[0]["write_ms"] / rows[1]["write_ms"],
            "zlib1_ratio_whole_state": median(rec["zlib_ratio"]),
            "zlib1_ms_whole_state": 1000 * median(rec["zlib_s"]),
            "model": label,
        },
        extra={
            "median_ms": {
                k: 1000 * median(v) for k, v in rec.items() if k.endswith(("_write", "_read"))
            }
        },
    )
