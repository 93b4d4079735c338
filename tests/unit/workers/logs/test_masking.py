"""Masking token by token is masking the whole line: Drain reads the same tokens either way."""

from __future__ import annotations

import re

import pytest

from benchmarks.common import DATA_DIR
from benchmarks.logs import load_systems
from workers.logs.masking import Masker, Masking

LOGHUB = DATA_DIR / "loghub"

EDGES = [
    "src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "user=root rhost=10.0.0.1  uid=0\tgid=0",
    "program interrupt: illegal instruction......0 at 0x1f3a",
    "  leading and trailing spaces  ",
    "mac 00:1A:2b:3C:4d:5E then 00-1a-2b-3c-4d-5e/x",
    "open /var/log/syslog.1 failed after 3.5s; /tmp/ ok (12ms)",
    "id=3f2b8c1e-9d4a-4f6e-8b7a-1c2d3e4f5a6b k=v=w",
    "deadbeef-dead-beef-dead-beefdeadbeef no digits in a uuid",
    "core.2275 attempt_1445_0020_m_000000_0 (uid=0) 003a90fc",
    "",
]


def _whole(masker: Masker, line: str) -> str:
    """The line masked in one piece, as the masker did before it worked token by token."""
    text = re.sub(r"(\w)=(\S)", r"\1= \2", re.sub(r"\.{2,}", " ", line))
    return masker.mask_whole(text)


@pytest.mark.parametrize("line", EDGES)
def test_token_wise_masking_equals_whole_line_masking(line: str) -> None:
    masker = Masking().masker()
    assert masker.mask(line).split() == _whole(masker, line).split()
    assert masker.mask(line) == masker.mask(line)  # remembered tokens give the same


@pytest.mark.skipif(not LOGHUB.is_dir(), reason=f"LogHub samples not at {LOGHUB}")
def test_every_loghub_line_masks_as_before() -> None:
    masker = Masking().masker()
    for system in load_systems(LOGHUB):
        for line in system.contents:
            assert masker.mask(line).split() == _whole(masker, line).split(), line


def test_a_full_token_memory_starts_over_with_the_same_results() -> None:
    small, big = Masker(Masking(), token_memory=4), Masker(Masking())
    for line in EDGES * 3:
        assert small.mask(line) == big.mask(line)
    assert len(small._seen) <= 4 < len(big._seen)


TOKENS = ["12345", "003a90fc", "core.2275", "12h", "3.5s", "12ms", "7us", "0x1f", "0X1F",
          "12:34", "blk_-42", "a1", "(uid=0)", "1/2", "10.0.0.1:80,", "٣٤", "１２", "²",
          "deadbeef-dead-beef-dead-beefdeadbeef", "aa:bb:cc:dd:ee:ff", "/var/log", "word",
          "WORD:", "a-b", "x", "-", "<NUM>", "12min", "4hours", "5n", "9_9", "1e5", "10%"]


@pytest.mark.parametrize("token", TOKENS)
def test_token_shortcuts_mask_as_the_masks_do(token: str) -> None:
    masker = Masker(Masking())
    assert masker.mask_token(token) == masker.mask_whole(token)


@pytest.mark.skipif(not LOGHUB.is_dir(), reason=f"LogHub samples not at {LOGHUB}")
def test_token_shortcuts_hold_on_every_loghub_token() -> None:
    masker = Masker(Masking())
    tokens = {t for system in load_systems(LOGHUB) for line in system.contents
              for t in re.sub(r"(\w)=(\S)", r"\1= \2", re.sub(r"\.{2,}", " ", line)).split()}
    assert [t for t in tokens if masker.mask_token(t) != masker.mask_whole(t)] == []


def test_other_masks_take_no_shortcut() -> None:
    masker = Masker(Masking(masks=((r"\d+", "N"),), name="digits"))
    assert masker.mask_token("ab12") == "ab<N>"
