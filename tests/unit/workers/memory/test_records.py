"""Chunking, memory records and the write plan: pure functions, no Redis, no model."""

from __future__ import annotations

import pytest

from workers.memory.chunks import extend_chunks
from workers.memory.lines import TranscriptLine
from workers.memory.persistence import plan_write
from workers.memory.records import (
    FIRST_FIELD,
    HEAD_FIELDS,
    NEXT_FIELD,
    SUMMARY_FIELD,
    Chunk,
    MemoryHead,
    MemoryRecordError,
    OpenChunk,
    SummaryMemory,
    chunk_field,
)


def _turns(n: int, tokens: int = 10) -> list[TranscriptLine]:
    return [TranscriptLine(f"100-{i}", f"S{i % 3}: line {i}\n", f"S{i % 3}", 5.0 * i,
                           7 + i * tokens, 7 + (i + 1) * tokens) for i in range(n)]


def _apply(head: MemoryHead, write_set: dict, write_delete: list, fields: dict) -> MemoryHead:
    """What Redis does with one HashUpdate (set, then delete), and the head read back."""
    fields.update(write_set)
    for name in write_delete:
        fields.pop(name, None)
    return MemoryHead.from_fields([fields.get(f) if not isinstance(fields.get(f), int)
                                   else str(fields[f]).encode()
                                   for f in HEAD_FIELDS])


def test_chunks_close_after_the_entry_that_fills_them() -> None:
    closed, still_open = extend_chunks(None, _turns(7), chunk_tokens=25)
    assert [(c.first_id, c.last_id, c.tokens) for c in closed] == [
        ("100-0", "100-2", 30), ("100-3", "100-5", 30)]
    assert still_open is not None and (still_open.first_id, still_open.last_id) == ("100-6",) * 2
    first = closed[0]
    assert first.text == "S0: line 0\nS1: line 1\nS2: line 2\n"
    assert first.speakers == ("S0", "S1", "S2")
    assert first.ts == (0.0, 10.0)
    assert (first.start, first.end) == (7, 37)


@pytest.mark.parametrize("cuts", [[1, 2, 3, 4, 5, 6], [3], [6], [2, 5]])
def test_chunk_boundaries_do_not_depend_on_batching(cuts: list[int]) -> None:
    """Replays by other workers batch differently: same chunks, same bytes."""
    turns = _turns(7)
    whole, whole_open = extend_chunks(None, turns, 25)
    pieces, current, start = [], None, 0
    for cut in [*cuts, len(turns)]:
        closed, current = extend_chunks(current, turns[start:cut], 25)
        pieces += closed
        start = cut
    assert [c.encode() for c in pieces] == [c.encode() for c in whole]
    assert current == whole_open


def test_empty_turns_never_open_a_chunk() -> None:
    eos = TranscriptLine("100-9", "", None, None, 50, 50)
    assert extend_chunks(None, [eos], 10) == ([], None)


def test_records_round_trip_and_refuse_foreign_bytes() -> None:
    chunk = Chunk("1-0", "2-0", "A: hi\n", 3, 9, ("A",), (1.5, 2.5), seq=4,
                  embedding=b"\x00\x3c" * 3, embed_model="m")
    assert Chunk.decode(chunk.encode()) == chunk
    summary = SummaryMemory("notes", "2-0", 40)
    assert SummaryMemory.decode(summary.encode()) == summary
    with pytest.raises(MemoryRecordError):
        Chunk.decode(b"\x93\x01\x02\x03")  # a msgpack list, not a record
    with pytest.raises(MemoryRecordError):
        OpenChunk.decode(b"\xc1")  # not msgpack at all


def test_plan_write_bounds_storage_and_deletes_the_oldest() -> None:
    fields: dict = {}
    head = MemoryHead()
    turns = _turns(40)
    for start in range(0, 40, 4):
        write = plan_write(head, turns[start:start + 4], chunk_tokens=10, max_chunks=5,
                           summary=None)
        assert not set(write.set) & set(write.delete)
        # a trimmed chunk goes with its embedding (written beside it after the commit)
        trimmed = [k for k in write.delete if k.startswith("chunk:")]
        assert {k for k in write.delete if k.startswith("vec:")} == {
            "vec:" + k.removeprefix("chunk:") for k in trimmed}
        head = _apply(head, write.set, write.delete, fields)
    chunks = sorted(k for k in fields if k.startswith("chunk:"))
    assert chunks == [chunk_field(s) for s in range(35, 40)]
    assert (head.first_seq, head.next_seq) == (35, 40)
    assert Chunk.decode(fields[chunk_field(39)]).first_id == "100-39"


def test_plan_write_of_one_batch_larger_than_the_bound() -> None:
    write = plan_write(MemoryHead(), _turns(9), chunk_tokens=10, max_chunks=3,
                           summary=SummaryMemory("s", "100-8", 97))
    assert sorted(k for k in write.set if k.startswith("chunk:")) == [
        chunk_field(6), chunk_field(7), chunk_field(8)]
    assert write.evicted == [6, 7, 8]  # no window: embedded right after the commit
    assert write.delete == []  # never stored, so never deleted
    assert write.set[FIRST_FIELD] == 6 and write.set[NEXT_FIELD] == 9
    assert SummaryMemory.decode(write.set[SUMMARY_FIELD]).covers == "100-8"


def test_retrieval_off_keeps_only_the_summary() -> None:
    write = plan_write(MemoryHead(), _turns(9), chunk_tokens=None, max_chunks=3,
                           summary=SummaryMemory("s", "100-8", 97))
    assert list(write.set) == [SUMMARY_FIELD] and write.delete == []


def test_chunks_are_embedded_when_they_leave_the_window_not_before() -> None:
    """Only text that left the model's window can be retrieved, so a closed chunk waits in the
    head's ``window`` list until the stream has moved a window past its end; the batch that
    moves it out lists it in ``evicted`` (for the vectorizer), exactly once."""
    fields: dict = {}
    head = MemoryHead()
    turns = _turns(40)  # 10 tokens each, from position 7
    evicted: list[int] = []
    for start in range(0, 40, 4):
        batch = turns[start:start + 4]
        horizon = batch[-1].end - 100  # a window of 100 tokens
        write = plan_write(head, batch, chunk_tokens=25, max_chunks=100, summary=None,
                           horizon=horizon)
        head = _apply(head, write.set, write.delete, fields)
        evicted += write.evicted
        assert all(end > horizon for _, end in head.in_window)  # still inside
        assert all(Chunk.decode(fields[chunk_field(s)]).end <= horizon for s in write.evicted)
    assert evicted == sorted(set(evicted))  # each once, in order
    closed = list(range(head.first_seq, head.next_seq))
    assert evicted + [s for s, _ in head.in_window] == closed
