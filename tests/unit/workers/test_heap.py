"""Freed heap memory goes back to the system at most once per interval."""

from __future__ import annotations

import platform

import psutil
import pytest

from workers.heap import HeapTrimmer, glibc_trim


def test_trims_at_most_once_per_interval_and_never_at_zero() -> None:
    now = [100.0]
    calls: list[float] = []

    def trim() -> bool:
        calls.append(now[0])
        return True

    trimmer = HeapTrimmer(1.0, trim=trim, clock=lambda: now[0])
    assert trimmer.maybe_trim()  # the first task trims
    now[0] += 0.5
    assert not trimmer.maybe_trim()
    now[0] += 0.6
    assert trimmer.maybe_trim()
    assert calls == [100.0, 101.1] and trimmer.trims == 2
    off = HeapTrimmer(0.0, trim=trim, clock=lambda: now[0])
    assert not off.available and not off.maybe_trim()
    assert len(calls) == 2


@pytest.mark.skipif(platform.system() != "Linux" or glibc_trim() is None
                    or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_holes_left_by_freed_states_go_back_to_the_system() -> None:
    # state-sized blocks (64 KB, under glibc's mmap threshold: they come from the heap),
    # every other one freed while its neighbours live on: holes free() keeps
    blocks = [bytearray(64 * 1024) for _ in range(1600)]
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    del blocks[::2]
    rss = psutil.Process().memory_info().rss
    assert HeapTrimmer(1.0).maybe_trim()
    released = rss - psutil.Process().memory_info().rss
    assert released > 20 * 2**20  # ~50 MiB of holes; most of it comes back
    del blocks
