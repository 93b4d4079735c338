from workers.processing.hot_cache import HotStateCache


def test_hit_only_on_the_same_version() -> None:
    cache: HotStateCache[str] = HotStateCache(budget_bytes=100)
    cache.put("a", 3, "state-a3", nbytes=10)
    assert cache.get("a", 3) == "state-a3"
    assert cache.get("a", 4) is None
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_budget_evicts_least_recently_used() -> None:
    cache: HotStateCache[str] = HotStateCache(budget_bytes=25)
    cache.put("a", 1, "A", nbytes=10)
    cache.put("b", 1, "B", nbytes=10)
    assert cache.get("a", 1) == "A"  # a is now most recent
    cache.put("c", 1, "C", nbytes=10)
    assert cache.get("b", 1) is None
    assert cache.get("a", 1) == "A" and cache.get("c", 1) == "C"
    assert cache.nbytes == 20 <= cache.budget_bytes


def test_state_larger_than_budget_is_not_kept() -> None:
    cache: HotStateCache[str] = HotStateCache(budget_bytes=5)
    cache.put("a", 1, "A", nbytes=6)
    assert len(cache) == 0 and cache.nbytes == 0


def test_a_lower_limit_evicts_now_and_bounds_later_puts() -> None:
    cache: HotStateCache[str] = HotStateCache(budget_bytes=30)
    for name in "abc":
        cache.put(name, 1, name.upper(), nbytes=10)
    assert cache.set_limit(15) == 15
    assert cache.nbytes == 10 and cache.get("c", 1) == "C"  # the most recent stays
    cache.put("d", 1, "D", nbytes=10)
    assert cache.nbytes == 10 and cache.get("d", 1) == "D"
    cache.put("big", 1, "B", nbytes=20)  # within the budget, over the limit: not kept
    assert cache.get("big", 1) is None
    assert cache.set_limit(100) == 30  # never above the budget
    assert cache.set_limit(-5) == 0 and len(cache) == 0
