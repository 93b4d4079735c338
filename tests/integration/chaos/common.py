"""Chaos helpers: seeded workloads, fault schedules, and the verdict against an uninterrupted run.

Every chaos scenario ends the same way (:func:`verify`): for each stream

* every published turn is in the input stream exactly once (producer retries neither lose nor
  duplicate: each turn carries a unique tag, counted in the untrimmed input stream);
* the committed entry id is the last input entry id (nothing left unapplied);
* the committed state is bit-identical to feeding the same entries straight into the engine in
  one uninterrupted pass in this process (so every entry was applied exactly once, in order:
  a skipped or repeated entry changes the tensors and ``tokens_seen``);
* every summary on the output stream is readable (all fields, parseable, covering an input entry
  that exists, covers strictly increasing: a batch published twice would repeat its ``covers``),
  and the latest-summary hash is the last output entry.

Workers run as real subprocesses (``tests/integration/pipeline/harness.py``); faults are real
signals and a real redis-server stop/restart. Seeds make every schedule reproducible:
``SINKSTREAM_CHAOS_SEED`` overrides the default.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.publisher import Producer
from producer.reader import read_entries
from sinkstream.contracts.entries import InputEntry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.ids import entry_id_key
from sinkstream.settings import Settings
from state_store.store import StateStore
from tests.integration.pipeline.harness import (
    ROOT,
    Worker,
    settings_from_env,
    snapshot_bytes,
)
from tests.threads import one_torch_thread
from workers.engines.base import Engine
from workers.engines.sinkkv.segments import whole_snapshot
from workers.processing.batches import entry_tokens

DEFAULT_SEED = 20261123
_TAG = re.compile(r"\[(?P<tag>[a-z0-9.-]+#\d+)\]")
_WORDS = ("invoice", "release", "friday", "crash", "notes", "budget", "owner", "customer",
          "deploy", "rollback", "latency", "ticket", "agenda", "review", "sinks", "window")


def chaos_seed() -> int:
    return int(os.environ.get("SINKSTREAM_CHAOS_SEED", DEFAULT_SEED))


def chaos_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """Harness env + what chaos runs need: chunked states (the chunk path gets killed too) and
    frequent tiny summaries (so 'every published summary stays readable' has something to
    check)."""
    return {
        **base,
        "SINKSTREAM_STATE_CHUNK_BYTES": "8192",
        "SINKSTREAM_SUMMARY_EVERY_TOKENS": "160",
        "SINKSTREAM_SUMMARY_MAX_NEW_TOKENS": "3",
        **extra,
    }


# ----- workloads --------------------------------------------------------------------------------
@dataclass
class Workload:
    """Turns per stream; each turn's text carries a unique ``[stream#n]`` tag."""

    turns: dict[str, list[tuple[str, str]]]

    @property
    def streams(self) -> list[str]:
        return list(self.turns)

    @property
    def entries(self) -> int:
        return sum(len(t) for t in self.turns.values())


def make_workload(seed: int, prefix: str, streams: int, turns: int) -> Workload:
    rng = random.Random(seed)
    out: dict[str, list[tuple[str, str]]] = {}
    for s in range(streams):
        sid = f"{prefix}-{s:03d}"
        rows = []
        for t in range(turns + rng.randrange(0, max(1, turns // 3))):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 9)))
            rows.append((f"[{sid}#{t}] {words}", rng.choice(("Ana", "Bo", "Cy"))))
        out[sid] = rows
    return Workload(out)


def publish(producer: Producer, workload: Workload, batch: int = 0) -> None:
    """Publish every stream's turns (``batch`` > 0: in slices of that many, interleaved)."""
    if batch <= 0:
        for sid, rows in workload.turns.items():
            producer.publish_many(sid, [(text, spk, None) for text, spk in rows])
        return
    longest = max(len(r) for r in workload.turns.values())
    for start in range(0, longest, batch):
        for sid, rows in workload.turns.items():
            part = rows[start : start + batch]
            if part:
                producer.publish_many(sid, [(text, spk, None) for text, spk in part])


def feed_live(producer: Producer, source: Workload, published: dict[str, list[tuple[str, str]]],
              done: threading.Event, pace_s: float, per_slice: int = 1,
              min_slices: int = 0) -> None:
    """Publish ``per_slice`` turns per stream every ``pace_s`` until ``done`` (after at least
    ``min_slices`` slices) or the shortest stream runs out: live input, recorded in
    ``published`` as it goes out."""
    longest = min(len(rows) for rows in source.turns.values())
    for n, start in enumerate(range(0, longest, per_slice)):
        if done.is_set() and n >= min_slices:
            return
        for sid, rows in source.turns.items():
            part = rows[start : start + per_slice]
            producer.publish_many(sid, [(text, spk, None) for text, spk in part])
            published.setdefault(sid, []).extend(part)
        done.wait(pace_s)


# ----- the verdict -------------------------------------------------------------------------------
@dataclass
class Verdict:
    streams: int = 0
    entries: int = 0
    lost: int = 0
    duplicated: int = 0
    unapplied: int = 0
    mismatched: list[str] = field(default_factory=list)
    summaries: int = 0
    bad_summaries: list[str] = field(default_factory=list)

    def add(self, other: Verdict) -> None:
        self.streams += other.streams
        self.entries += other.entries
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.unapplied += other.unapplied
        self.mismatched += other.mismatched
        self.summaries += other.summaries
        self.bad_summaries += other.bad_summaries

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unapplied or self.mismatched
                    or self.bad_summaries)

    def describe(self) -> str:
        return (f"{self.streams} streams, {self.entries} entries: lost {self.lost}, duplicated "
                f"{self.duplicated}, unapplied {self.unapplied}, mismatched {self.mismatched}, "
                f"summaries {self.summaries}, bad summaries {self.bad_summaries[:5]}")


class Reference:
    """The uninterrupted run: one engine in this process, each entry fed once, in order."""

    def __init__(self, settings: Settings) -> None:
        from workers.engines.loading import load_engine

        self.settings = settings
        with one_torch_thread():  # its first forward (the fresh state) included
            self.engine: Engine[Any] = load_engine(settings)

    def tensors(self, entries: Iterable[InputEntry]) -> dict[str, bytes]:
        with one_torch_thread():
            state = self.engine.new_state()
            for index, turn in enumerate(entries):
                ids = entry_tokens(self.engine, [turn], at_stream_start=index == 0)
                state = self.engine.feed(state, ids)
            return snapshot_bytes(self.engine.export_state(state))


def committed(client: redis.Redis, stream: str) -> tuple[str | None, dict[str, bytes] | None]:
    stored = StateStore(client).load(stream)
    if stored is None:
        return None, None
    # either state layout (whole, or segments reassembled)
    return stored.last_entry_id, snapshot_bytes(whole_snapshot(stored.data, stored.segments))


def verify(client: redis.Redis, reference: Reference, workload: Workload) -> Verdict:
    total = Verdict()
    for sid, rows in workload.turns.items():
        total.add(verify_stream(client, reference, sid, [t for t, _ in rows]))
    return total


def verify_stream(
    client: redis.Redis, reference: Reference, stream: str, texts: Sequence[str]
) -> Verdict:
    v = Verdict(streams=1, entries=len(texts))
    parsed = list(read_entries(client, stream,
                               max_text_bytes=reference.settings.max_entry_bytes))
    valid = [e for e in parsed if isinstance(e, InputEntry)]
    seen = Counter(m.group("tag") for e in valid if (m := _TAG.match(e.text)))
    for text in texts:
        match = _TAG.match(text)
        assert match is not None
        count = seen.get(match.group("tag"), 0)
        if count == 0:
            v.lost += 1
        elif count > 1:
            v.duplicated += count - 1
    last_id, tensors = committed(client, stream)
    if parsed:
        ids = [e.id for e in parsed]
        if last_id is None:
            v.unapplied += len(ids)
        elif last_id != ids[-1]:
            v.unapplied += sum(1 for i in ids if entry_id_key(i) > entry_id_key(last_id))
    if tensors is not None and tensors != reference.tensors(valid):
        v.mismatched.append(stream)
    v.summaries, v.bad_summaries = check_summaries(client, stream, {e.id for e in parsed})
    return v


def check_summaries(
    client: redis.Redis, stream: str, input_ids: set[str]
) -> tuple[int, list[str]]:
    keys = StreamKeys.of(stream)
    outputs = client.xrange(keys.output)
    bad: list[str] = []
    previous: tuple[int, int] | None = None
    last_fields: dict[bytes, bytes] | None = None
    for entry_id, fields in outputs:
        eid = entry_id.decode()
        missing = {b"kind", b"text", b"covers", b"tokens_seen", b"model", b"ts"} - set(fields)
        if missing:
            bad.append(f"{stream} {eid}: missing {sorted(missing)}")
            continue
        try:
            fields[b"text"].decode("utf-8")
            int(fields[b"tokens_seen"])
            float(fields[b"ts"])
        except ValueError as exc:
            bad.append(f"{stream} {eid}: unreadable ({exc})")
            continue
        covers = fields[b"covers"].decode()
        if fields[b"kind"] in (b"rolling", b"final"):
            if covers not in input_ids:
                bad.append(f"{stream} {eid}: covers {covers} is not an input entry")
            if previous is not None and entry_id_key(covers) <= previous:
                bad.append(f"{stream} {eid}: covers {covers} published twice / out of order")
            previous = entry_id_key(covers)
        last_fields = fields
    if last_fields is not None:
        summary = client.hgetall(keys.summary)
        if summary != last_fields:
            bad.append(f"{stream}: summary hash is not the last output entry")
    return len(outputs), bad


def all_caught_up(client: redis.Redis, streams: Iterable[str]) -> bool:
    for sid in streams:
        last = client.xrevrange(StreamKeys.of(sid).input, count=1)
        if not last:
            return False
        info = StateStore(client).info(sid)
        if info is None or info.last_entry_id != last[0][0].decode():
            return False
    return True


def total_versions(client: redis.Redis, streams: Iterable[str]) -> int:
    return sum(StateStore(client).version(s) for s in streams)


# ----- workers and logs --------------------------------------------------------------------------
def mid_task(worker: Worker) -> bool:
    """True if the worker's log shows a task received and not yet finished (a mid-batch kill)."""
    lines = [ln for ln in worker.log.read_text(errors="replace").splitlines()
             if "celery.worker.strategy" in ln or "celery.app.trace" in ln]
    return bool(lines) and "received" in lines[-1]


def log_lines(path: Path, levels: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL"),
              since: str = "") -> list[str]:
    """Log records at ``levels`` (one per record, tracebacks not counted), after the first line
    containing ``since``."""
    text = path.read_text(errors="replace") if path.exists() else ""
    if since and since in text:
        text = text[text.index(since):]
    pattern = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (" + "|".join(levels) + r") ")
    return [ln for ln in text.splitlines() if pattern.match(ln)]


def busy_outcomes(worker: Worker) -> int:
    return worker.log.read_text(errors="replace").count("'status': 'busy'")


# ----- a producer in its own process -------------------------------------------------------------
def start_producer(env: dict[str, str], tmp: Path, spec: dict[str, Any], name: str = "producer"
                   ) -> tuple[subprocess.Popen[bytes], Path]:
    """Run ``tests.integration.chaos.producer_proc`` (publishes ``spec`` slowly, retrying
    through outages)."""
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.chaos.producer_proc", str(spec_path)],
        env=env, cwd=ROOT,
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return proc, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"producer still running after {timeout}s:\n"
                             f"{log.read_text(errors='replace')[-3000:]}") from None
    assert rc == 0, log.read_text(errors="replace")[-3000:]


def workload_spec(workload: Workload, pause_s: float, batch: int, attempts: int) -> dict[str, Any]:
    return {"turns": workload.turns, "pause_s": pause_s, "batch": batch, "attempts": attempts}


def settings_for(env: dict[str, str]) -> Settings:
    return settings_from_env(env)


def rejected_reasons(client: redis.Redis, stream: str) -> list[str]:
    return [f[b"reason"].decode() for _, f in client.xrange(StreamKeys.of(stream).dead)]

