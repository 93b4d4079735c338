"""Template mining: masking, the miner's msgpack state, and replays that mine identically."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.common import DATA_DIR
from benchmarks.logs import load_systems
from sinkstream.contracts.formats import NewerFormatError
from tests.unit.workers.logs.first_format import miner_blob
from workers.logs.masking import Masking
from workers.logs.mining import (
    FORMAT_VERSION,
    HEAD_FIELD,
    MATCH_MEMORY,
    Miner,
    MinerStateError,
    MinerTooNewError,
    MiningConfig,
)

LOGHUB = DATA_DIR / "loghub"

LINES = [
    "Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "Receiving block blk_7503483334202473044 src: /10.251.215.16:55695 dest: /10.251.215.16:50010",
    "PacketResponder 1 for block blk_-1608999687919862906 terminating",
    "Task attempt_1445144423722_0020_m_000000_0 Transitioned from NEW to UNASSIGNED",
    "Task attempt_1445144423722_0020_m_000001_0 Transitioned from NEW to UNASSIGNED",
    "Task attempt_1445144423722_0020_m_000001_0 Transitioned from UNASSIGNED to ASSIGNED",
    "cupsd startup succeeded",
    "cupsd shutdown succeeded",
    "request 3f2b8c1e-9d4a-4f6e-8b7a-1c2d3e4f5a6b took 35ms",
    "request 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d took 1.5s",
]


def test_masks_and_grouping() -> None:
    masker = Masking().masker()
    assert masker.mask(LINES[0]) == "Receiving block <BLK> src: /<IP> dest: /<IP>"
    assert masker.mask("program interrupt: illegal instruction......0") == \
        "program interrupt: illegal instruction <NUM>"
    miner = Miner()
    ids = [miner.add(line).template_id for line in LINES]
    assert ids[0] == ids[1] != ids[2]
    assert ids[3] == ids[4] != ids[5], "enum states tell events apart"
    assert ids[6] != ids[7], "a changed word is another event"
    assert ids[8] == ids[9], "durations and UUIDs are variables"


def _commit(miner: Miner, stored: dict[str, bytes]) -> dict[str, bytes]:
    """What a batch's commit does to the logs hash: set the fields the miner changed."""
    stored.update(miner.take_changes())
    return stored


def test_state_round_trip_mines_identically() -> None:
    straight, resumed = Miner(), Miner()
    kept_straight: dict[str, bytes] = {}
    kept: dict[str, bytes] = {}
    for line in LINES[:5]:
        straight.add(line)
        resumed.add(line)
    _commit(straight, kept_straight)
    resumed = Miner.from_fields(_commit(resumed, kept))
    assert kept == kept_straight
    tail_a = [straight.add(line) for line in LINES[5:] * 2]
    tail_b = [resumed.add(line) for line in LINES[5:] * 2]
    assert tail_a == tail_b
    assert _commit(resumed, kept) == _commit(straight, kept_straight)
    assert resumed.match(LINES[1]) == straight.match(LINES[1]) is not None


def test_a_batch_writes_only_the_clusters_it_matched() -> None:
    miner = Miner()
    mined = [miner.add(line) for line in LINES]
    first = miner.take_changes()
    assert {f"miner:c:{m.template_id}" for m in mined} < set(first)
    assert any(name.startswith("miner:tree:") for name in first)
    again = miner.add(LINES[1])  # an existing template: its size, and the counter's head
    assert set(miner.take_changes()) == {"miner:head", f"miner:c:{again.template_id}"}
    assert miner.take_changes() == {"miner:head": first["miner:head"]}


def test_a_first_format_miner_is_read_and_written_whole_as_fields() -> None:
    straight = Miner()
    for line in LINES[:5]:
        straight.add(line)
    old = Miner.decode(miner_blob(straight))
    kept = _commit(straight, {})
    assert old.take_changes() == kept
    assert [old.add(line) for line in LINES[5:]] == [straight.add(line) for line in LINES[5:]]


def test_foreign_or_corrupt_states_are_refused() -> None:
    fields = Miner().take_changes()
    with pytest.raises(MinerStateError, match="mined as"):
        Miner.from_fields(fields, MiningConfig(sim_th=0.4))
    with pytest.raises(MinerStateError):
        Miner.from_fields({"miner:head": b"\xc1garbage"})
    with pytest.raises(MinerStateError, match="no 'miner:head'"):
        Miner.from_fields({})
    with pytest.raises(MinerStateError, match="malformed"):
        Miner.from_fields({**fields, "miner:c:x": msgpack.packb([["a"], 1])})
    deep: list[object] = [[], {}]
    for _ in range(50):
        deep = [[], {"x": deep}]
    with pytest.raises(MinerStateError, match="malformed"):
        Miner.from_fields({**fields, "miner:tree:3": msgpack.packb([[], ["x"]]),
                           "miner:tree:3:x": msgpack.packb(deep)})
    with pytest.raises(MinerStateError, match="malformed"):  # a child without its subtree
        Miner.from_fields({**fields, "miner:tree:3": msgpack.packb([[], ["x"]])})
    with pytest.raises(MinerStateError, match="malformed"):
        Miner.decode(msgpack.packb({"v": 1, "fp": MiningConfig().fingerprint, "n": 0,
                                    "c": [], "t": deep}))
    with pytest.raises(MinerStateError, match="another format"):
        Miner.decode(fields["miner:head"])


def test_a_miner_from_a_newer_build_is_told_apart_from_a_corrupt_one() -> None:
    """Left for an upgraded worker, not parked (``sinkstream.contracts.formats``)."""
    fields = Miner().take_changes()
    head = msgpack.unpackb(fields[HEAD_FIELD])
    newer = {**fields, HEAD_FIELD: msgpack.packb({**head, "v": FORMAT_VERSION + 1})}
    with pytest.raises(MinerTooNewError, match=f"log miner is format version "
                                               f"{FORMAT_VERSION + 1}, newer than") as info:
        Miner.from_fields(newer)
    assert isinstance(info.value, NewerFormatError)
    for wrong in (0, "3", True):
        with pytest.raises(MinerStateError, match="another format") as refused:
            Miner.from_fields({**fields, HEAD_FIELD: msgpack.packb({**head, "v": wrong})})
        assert not isinstance(refused.value, NewerFormatError)


def test_a_full_miner_counts_the_unmatched_as_other() -> None:
    from workers.logs.mining import OTHER_ID

    miner = Miner(MiningConfig(max_templates=2))
    assert miner.add("alpha beta gamma").change == "created"
    assert miner.add("delta epsilon").change == "created"
    assert miner.add("zeta eta theta iota").template_id == OTHER_ID
    assert miner.add("alpha beta gamma").template_id != OTHER_ID
    assert len(miner.templates) == 2


def test_an_equal_line_scores_as_the_token_loop_does() -> None:
    from workers.logs.mining import _Drain

    drain = _Drain(depth=5, sim_th=0.6)
    for template in [("a", "<*>", "b"), ("<*>", "<*>"), ("x",), ("A", "<NUM>", "<*>", "c")]:
        for include in (False, True):
            line = list(template)
            same = drain.get_seq_distance(template, line, include)
            # the same tokens as a list: the general loop
            assert same == drain.get_seq_distance(list(template), line, include)


def test_an_equal_line_merges_as_the_token_loop_does() -> None:
    from drain3.drain import Drain

    from workers.logs.mining import _Drain

    ours, theirs = _Drain(depth=5, sim_th=0.6), Drain(depth=5, sim_th=0.6)
    for line, template in [(["a", "b"], ("a", "b")), (["a", "c"], ("a", "b")),
                           (["<*>", "x"], ("<*>", "x")), ([], ())]:
        assert ours.create_template(line, template) == theirs.create_template(line, template)


# ----- remembered matches (``Miner._matched``) -------------------------------------------------


def _mined_both_ways(lines: list[str], memory: int = MATCH_MEMORY,
                     commit_every: int = 250) -> None:
    """``lines`` mined with remembered matches and with Drain's tree search for every one:
    the same template, text and change for every line, and the same committed fields."""
    remembering, searching = Miner(match_memory=memory), Miner(match_memory=0)
    for index, line in enumerate(lines, 1):
        assert remembering.add(line) == searching.add(line), line
        if index % commit_every == 0 or index == len(lines):
            assert remembering.take_changes() == searching.take_changes()
        assert len(remembering._matched) <= memory


@pytest.mark.skipif(not LOGHUB.is_dir(), reason="../shared/data/loghub is absent")
def test_remembered_matches_mine_the_loghub_samples_as_drain_does() -> None:
    systems = load_systems(LOGHUB)
    hits = 0
    for system in systems:
        _mined_both_ways(system.contents)
        miner = Miner()
        for line in system.contents:
            seen = miner.masker.mask(line) in miner._matched
            miner.add(line)
            hits += seen
    # most lines are remembered: what makes it worth having
    assert hits > 0.8 * sum(len(s.contents) for s in systems)


def test_a_small_memory_forgets_and_still_mines_as_drain_does() -> None:
    lines = [f"job {i % 7} moved from NEW to {('RUNNING', 'DONE')[i % 2]} on node"
             for i in range(60)] + LINES * 3
    _mined_both_ways(lines, memory=2, commit_every=7)


_WORDS = st.sampled_from(["open", "close", "file", "NEW", "DONE", "RUNNING", "x1", "42",
                          "node", "Node", "ok", "<*>", "a", "b"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_WORDS, min_size=1, max_size=6).map(" ".join), max_size=80))
def test_remembered_matches_never_change_what_drain_finds(lines: list[str]) -> None:
    """A template created or changed can route an earlier message elsewhere: remembered
    matches are forgotten then, so any sequence mines as Drain alone mines it."""
    _mined_both_ways(lines, commit_every=5)
