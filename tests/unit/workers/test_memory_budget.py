"""The hot cache gives way while the worker's RSS growth, peaks included, exceeds the budget."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from workers.memory_budget import RssBudget, peak_rss_since_reset
from workers.processing.hot_cache import HotStateCache

MiB = 1 << 20


class FakeProcess:
    """RSS readings the test sets: ``rss`` now, ``peak`` since the last reset."""

    def __init__(self, rss: int) -> None:
        self.rss = rss
        self.peak = rss
        self.resets = 0

    def read_peak(self) -> int:
        return max(self.peak, self.rss)

    def reset(self) -> bool:
        self.resets += 1
        self.peak = self.rss
        return True


def _budget(cache: HotStateCache[object], proc: FakeProcess) -> RssBudget:
    return RssBudget(cache, cache.budget_bytes, read_peak=proc.read_peak,
                     reset_peak=proc.reset, read_current=lambda: proc.rss)


def _started(budget_mib: int, rss_mib: int
             ) -> tuple[HotStateCache[object], FakeProcess, RssBudget]:
    """A cache of ``budget_mib``, a process at ``rss_mib``, and its budget's baseline."""
    cache: HotStateCache[object] = HotStateCache(budget_bytes=budget_mib * MiB)
    proc = FakeProcess(rss=rss_mib * MiB)
    budget = _budget(cache, proc)
    budget.start()
    return cache, proc, budget


def _fill(cache: HotStateCache[object], n: int, size: int = MiB) -> None:
    for i in range(n):
        cache.put(f"s{i}", 1, object(), nbytes=size)


def test_growth_past_the_budget_lowers_the_cache_limit_by_the_excess() -> None:
    cache, proc, budget = _started(10, 500)
    assert budget.baseline == 500 * MiB
    _fill(cache, 10)
    proc.rss += 10 * MiB + 3 * MiB  # the full cache, plus 3 MiB the cache cannot see
    budget.check()
    assert budget.growth == 13 * MiB
    assert cache.limit_bytes == 7 * MiB and cache.nbytes == 7 * MiB


def test_a_peak_between_checks_counts_and_is_reset() -> None:
    cache, proc, budget = _started(10, 100)
    _fill(cache, 8)
    proc.rss += 8 * MiB
    proc.peak = proc.rss + 5 * MiB  # a batch's working set came and went
    budget.check()
    assert budget.growth == 13 * MiB and cache.limit_bytes == 5 * MiB
    assert proc.peak == proc.rss  # the next check sees a new peak only


def test_room_comes_back_half_of_what_is_free_per_check() -> None:
    cache, proc, budget = _started(16, 100)
    cache.set_limit(0)
    proc.rss += 8 * MiB  # memory outside the cache: 8 MiB of the budget are left for states
    budget.check()
    assert cache.limit_bytes == 4 * MiB
    budget.check()
    assert cache.limit_bytes == 6 * MiB
    proc.rss -= 8 * MiB  # the other memory went away: the limit climbs to the budget
    for _ in range(30):
        budget.check()
    assert cache.limit_bytes == 16 * MiB


def test_memory_outside_the_cache_lowers_the_limit_before_the_cache_fills() -> None:
    cache, proc, budget = _started(10, 100)
    _fill(cache, 2)
    proc.rss += 2 * MiB + 6 * MiB  # two states, and 6 MiB the first batches allocated
    budget.check()
    assert budget.growth == 8 * MiB  # within the budget, but only 4 MiB are left for states
    assert cache.limit_bytes == 4 * MiB and cache.nbytes == 2 * MiB
    _fill(cache, 6)
    assert cache.nbytes == 4 * MiB


def test_within_the_budget_nothing_is_evicted() -> None:
    cache, proc, budget = _started(10, 100)
    _fill(cache, 9)
    proc.rss += 9 * MiB + MiB // 2
    budget.check()
    assert cache.limit_bytes == 9 * MiB + MiB // 2 and cache.nbytes == 9 * MiB


def test_a_batching_worker_keeps_its_flight_reserve_free_of_states() -> None:
    cache: HotStateCache[object] = HotStateCache(budget_bytes=16 * MiB)
    proc = FakeProcess(rss=100 * MiB)
    budget = RssBudget(cache, cache.budget_bytes, read_peak=proc.read_peak,
                       reset_peak=proc.reset, read_current=lambda: proc.rss,
                       reserve_bytes=6 * MiB)
    budget.start()
    assert cache.limit_bytes == 10 * MiB  # before any batched task has run
    _fill(cache, 12)
    assert cache.nbytes == 10 * MiB
    proc.rss += 10 * MiB + 2 * MiB  # the states, and 2 MiB of the first batches
    budget.check()
    assert cache.limit_bytes == 8 * MiB  # the other memory and the reserve come first
    proc.rss -= 2 * MiB  # the two states it evicted are freed
    proc.peak = proc.rss + 6 * MiB  # a batched task's 6 MiB of streams came and went
    budget.check()
    # that flight counts as growth and again as the reserve: the cache errs on the small side
    assert cache.limit_bytes == 16 * MiB - (2 + 6) * MiB - 6 * MiB
    proc.rss = 100 * MiB + cache.nbytes + 2 * MiB  # evicted states freed; quiet again:
    for _ in range(30):  # the room comes back, never into the reserve
        budget.check()
    assert cache.limit_bytes == 8 * MiB


def test_the_first_check_takes_the_baseline_without_the_cache_held() -> None:
    cache: HotStateCache[object] = HotStateCache(budget_bytes=10 * MiB)
    _fill(cache, 2)
    proc = FakeProcess(rss=300 * MiB)
    budget = _budget(cache, proc)
    budget.check()
    assert budget.baseline == 298 * MiB and cache.limit_bytes == 10 * MiB


def test_checks_run_at_most_once_per_interval() -> None:
    cache: HotStateCache[object] = HotStateCache(budget_bytes=MiB)
    proc = FakeProcess(rss=10 * MiB)
    now = [0.0]
    budget = RssBudget(cache, MiB, read_peak=proc.read_peak, reset_peak=proc.reset,
                       read_current=lambda: proc.rss, interval_s=1.0, clock=lambda: now[0])
    assert budget.maybe_check() and not budget.maybe_check()
    now[0] += 1.0
    assert budget.maybe_check()


_KERNEL_PEAK_PROBE = """
from workers.memory_budget import peak_rss_since_reset, reset_peak_rss
MiB = 1 << 20
if not reset_peak_rss():
    raise SystemExit(77)
before = peak_rss_since_reset()
block = bytearray(64 * MiB)
block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
del block
peak = peak_rss_since_reset()
assert reset_peak_rss()
after = peak_rss_since_reset()
print(before, peak, after)
"""


@pytest.mark.skipif(platform.system() != "Linux" or peak_rss_since_reset() is None,
                    reason="reads /proc/self/status")
def test_the_kernel_peak_sees_a_transient_allocation_until_reset() -> None:
    # A fresh interpreter: in the suite's own process other threads free and allocate
    # memory between the reset and the reading, so the peak's growth is not the block's.
    done = subprocess.run([sys.executable, "-c", _KERNEL_PEAK_PROBE], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[3])
    if done.returncode == 77:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert done.returncode == 0, done.stderr
    before, peak, after = (int(n) for n in done.stdout.split())
    assert peak - before > 48 * MiB
    assert after < peak - 48 * MiB
