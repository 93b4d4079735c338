"""Replay transcripts into a stream: as fast as possible, in real time, or tailing a file.

* ``replay(..., realtime=False)``: batches of ``Producer.batch_entries`` per script call.
* ``replay(..., realtime=True, speed=X)``: each turn is published when its ``ts`` comes due,
  relative to the first timed turn, ``X`` times faster than real time. Turns without ``ts``
  (or going back in time) go out right after the previous one, so nothing waits forever.
* ``follow(path, fmt)``: like ``tail -f -n +1``: publishes what the file holds, then every
  complete line appended later, surviving truncation and rotation, until Ctrl-C or
  ``idle_timeout`` seconds without new data. Only line formats (text, jsonl) can be followed:
  a half-written VTT cue has no well-defined end.
* ``stream_chunks(binary_file, fmt)``: stdin, published as data arrives (a pipe from a live
  captioner should not wait for end of file).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from producer.formats import LINE_FORMATS, InputFormatError, LineDecoder, Turn, parse_lines
from producer.publisher import Producer, PublishResult

log = logging.getLogger(__name__)

Sleep = Callable[[float], None]
Clock = Callable[[], float]


def _merge(total: PublishResult, part: PublishResult) -> None:
    total.entries += part.entries
    total.duplicates += part.duplicates
    total.last_id = part.last_id or total.last_id


def timed_groups(turns: Iterable[Turn], speed: float = 1.0) -> Iterator[tuple[float, list[Turn]]]:
    """Group turns by due time: ``(seconds after the first timed turn / speed, turns)``.

    Consecutive turns due at the same moment share a group (one script call).
    """
    if speed <= 0:
        raise ValueError("speed must be positive")
    t0: float | None = None
    due = 0.0
    group: list[Turn] = []
    for turn in turns:
        if turn.ts is not None:
            if t0 is None:
                t0 = turn.ts
            due_here = max(due, (turn.ts - t0) / speed)
        else:
            due_here = due
        if group and due_here > due:
            yield due, group
            group = []
        due = due_here
        group.append(turn)
    if group:
        yield due, group


def replay(
    producer: Producer,
    stream: str,
    turns: Iterable[Turn],
    *,
    realtime: bool = False,
    speed: float = 1.0,
    eos: bool = True,
    on_progress: Callable[[int], None] | None = None,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> PublishResult:
    """Publish ``turns`` to ``stream`` (then the end-of-stream marker if ``eos``)."""
    if not realtime:
        return producer.publish_many(stream, turns, eos=eos, on_progress=on_progress)
    total = PublishResult()
    start = clock()
    for due, group in timed_groups(turns, speed):
        wait = start + due - clock()
        if wait > 0:
            sleep(wait)
        _merge(total, producer.publish_many(stream, group))
        if on_progress is not None:
            on_progress(len(group))
    if eos:
        total.last_id = producer.end_stream(stream)
        total.entries += 1
    return total


def publish_live(
    producer: Producer,
    stream: str,
    batches: Iterable[list[Turn]],
    *,
    eos: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> PublishResult:
    """Publish batches as a live source yields them; Ctrl-C ends the source, not the program:
    the end-of-stream marker still goes out (if ``eos``) and the result is returned."""
    total = PublishResult()
    try:
        for batch in batches:
            if batch:
                _merge(total, producer.publish_many(stream, batch))
                if on_batch is not None:
                    on_batch(len(batch))
    except KeyboardInterrupt:
        log.info("interrupted: ending %s", stream)
    if eos:
        total.last_id = producer.end_stream(stream)
        total.entries += 1
    return total


def _require_line_format(fmt: str, what: str) -> None:
    if fmt not in LINE_FORMATS:
        raise InputFormatError(
            f"{what} works with line formats ({', '.join(LINE_FORMATS)}), not {fmt!r}"
        )


def stream_chunks(
    source: BinaryIO, fmt: str, name: str = "<stdin>", detect_speakers: bool = True,
    chunk_bytes: int = 65536,
) -> Iterator[list[Turn]]:
    """Turns from a binary stream, one list per read, as soon as lines are complete."""
    _require_line_format(fmt, "streaming input")
    decoder = LineDecoder(name)
    read = getattr(source, "read1", source.read)
    while True:
        data = read(chunk_bytes)
        if not data:
            break
        yield list(parse_lines(decoder.feed(data), fmt, name, detect_speakers))
    yield list(parse_lines(decoder.finish(), fmt, name, detect_speakers))


def follow(
    path: str | Path,
    fmt: str,
    *,
    idle_timeout: float | None = None,
    poll_interval: float = 0.25,
    detect_speakers: bool = True,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> Iterator[list[Turn]]:
    """Turns of ``path`` from its start, then as it grows (``tail -f -n +1``).

    Stops after ``idle_timeout`` seconds without new data (the last, unterminated line is
    then published too); otherwise runs until the consumer stops or Ctrl-C. A truncated file
    is re-read from its start; a replaced (rotated) file is reopened.
    """
    _require_line_format(fmt, "--follow")
    path = Path(path)
    name = str(path)
    try:
        handle: BinaryIO = path.open("rb")
    except OSError as exc:
        raise InputFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    decoder = LineDecoder(name)
    idle_since = clock()
    try:
        while True:
            data = handle.read(65536)
            if data:
                yield list(parse_lines(decoder.feed(data), fmt, name, detect_speakers))
                idle_since = clock()
                continue
            reopened = _check_rotation(path, handle)
            if reopened is not None:
                yield list(parse_lines(decoder.finish(), fmt, name, detect_speakers))
                handle.close()
                handle, decoder = reopened, LineDecoder(name)
                continue
            if idle_timeout is not None and clock() - idle_since >= idle_timeout:
                yield list(parse_lines(decoder.finish(), fmt, name, detect_speakers))
                return
            sleep(poll_interval)
    finally:
        handle.close()


def _check_rotation(path: Path, handle: BinaryIO) -> BinaryIO | None:
    """A fresh handle if ``path`` was truncated or replaced since ``handle`` was opened."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return None  # rotated away, new file not there yet: keep waiting
    current = os.fstat(handle.fileno())
    if (on_disk.st_dev, on_disk.st_ino) != (current.st_dev, current.st_ino):
        log.info("%s was replaced; following the new file", path)
        return path.open("rb")
    if on_disk.st_size < handle.tell():
        log.warning("%s was truncated; reading it again from the start", path)
        return path.open("rb")
    return None
