"""Radix cache invariants under random operations, and LRU order."""

from __future__ import annotations

import random

import pytest

from scheduler.sim.radix import RadixCache


def _is_prefix_of_any(prefix: list[int], seqs: list[list[int]]) -> bool:
    return any(s[: len(prefix)] == prefix for s in seqs)


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_invariants(seed: int) -> None:
    rng = random.Random(seed)
    cache = RadixCache(capacity=rng.choice([20, 60, 200]))
    inserted: list[list[int]] = []
    locks: list[tuple[list[int], object]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.45:
            base = rng.choice(inserted) if inserted and rng.random() < 0.6 else []
            seq = base[: rng.randint(0, len(base))] + [rng.randint(0, 4) for _ in range(rng.randint(1, 12))]
            cache.insert(seq)
            inserted.append(seq)
        elif op < 0.7 and inserted:
            query = rng.choice(inserted)[:] + [rng.randint(0, 4)]
            m = cache.match_prefix(query)
            assert _is_prefix_of_any(query[: m.length], inserted)  # really inserted ...
            assert m.length == 0 or _is_prefix_of_any(query[: m.length], cache.sequences())  # ... and still stored
            if rng.random() < 0.3:
                cache.lock(m.node)
                locks.append((query[: m.length], m.node))
        elif op < 0.85:
            cache.evict(rng.randint(1, 30))
        elif locks:
            _, node = locks.pop(rng.randrange(len(locks)))
            cache.unlock(node)  # type: ignore[arg-type]
        stored = cache.sequences()
        assert cache.size <= cache.capacity
        assert cache.size == _count_tokens(cache)
        assert 0 <= cache.evictable_size <= cache.size
        for prefix, _ in locks:  # locked prefixes are never evicted
            assert not prefix or _is_prefix_of_any(prefix, stored)
            assert cache.match_prefix(prefix).length == len(prefix)


def _count_tokens(cache: RadixCache) -> int:
    total, stack = 0, [cache.root]
    while stack:
        node = stack.pop()
        total += len(node.key)
        stack.extend(node.children.values())
    return total


def test_lru_evicts_least_recently_used_leaf_first() -> None:
    cache = RadixCache(capacity=100)
    a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    for seq in (a, b, c):
        cache.insert(seq)
    cache.match_prefix(a)  # a is now the most recent
    assert cache.evict(4) == 4
    assert sorted(cache.sequences()) == [a, c]  # (sequences() does not touch)
    assert cache.evict(4) == 4  # c was used before a
    assert cache.sequences() == [a]


def test_insert_beyond_capacity_evicts_and_locked_prefix_survives() -> None:
    cache = RadixCache(capacity=10)
    cache.insert([1] * 6)
    m = cache.match_prefix([1] * 6)
    cache.lock(m.node)
    assert cache.insert([2] * 6) == 4  # only what fits beside the locked 6
    assert cache.size == 10
    assert cache.evict(100) == 4
    assert cache.match_prefix([1] * 6).length == 6
    cache.unlock(m.node)
    assert cache.evict(100) == 6 and cache.size == 0


def test_shared_prefix_is_stored_once_and_split_on_partial_match() -> None:
    cache = RadixCache(capacity=100)
    cache.insert([1, 2, 3, 4, 5])
    assert cache.insert([1, 2, 3, 9, 9]) == 2
    assert cache.size == 7
    assert cache.match_prefix([1, 2, 3, 4, 7]).length == 4
    assert sorted(cache.sequences()) == [[1, 2, 3, 4, 5], [1, 2, 3, 9, 9]]


def test_match_and_insert_can_continue_from_a_locked_match() -> None:
    cache = RadixCache(capacity=100)
    cache.insert([1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 3, 4, 5])
    cache.lock(m.node)
    assert cache.insert([5, 6], start=m) == 2  # tokens after the matched prefix only
    assert cache.match_prefix([7], start=m).length == 4
    cache.unlock(m.node)
    assert cache.sequences() == [[1, 2, 3, 4, 5, 6]] and cache.size == 6


def test_priority_eviction_takes_the_lowest_priority_first_then_lru() -> None:
    """SGLang's ``--radix-eviction-policy priority``: a high-priority leaf outlives more recent
    low-priority ones; among equals, LRU; under ``lru`` the priorities are ignored."""
    for eviction, survivor in (("priority", [1, 1, 1]), ("lru", [3, 3, 3])):
        cache = RadixCache(capacity=9, eviction=eviction)
        cache.insert([1, 1, 1], priority=50)  # oldest, but protected
        cache.insert([2, 2, 2], priority=10)
        cache.insert([3, 3, 3], priority=10)  # most recent
        cache.insert([4, 4, 4, 4, 4, 4], priority=10)  # needs six: two leaves go
        left = [s for s in cache.sequences() if s[0] != 4]
        assert left == [survivor], eviction


def test_priority_is_raised_along_the_path_and_never_lowered() -> None:
    cache = RadixCache(capacity=100, eviction="priority")
    cache.insert([9] * 10 + [1, 1], priority=5)
    cache.insert([9] * 10 + [2, 2], priority=80)  # splits the shared prefix, raises it to 80
    prefix = cache.root.children[9]
    assert prefix.key == [9] * 10 and prefix.priority == 80
    assert {c.key[0]: c.priority for c in prefix.children.values()} == {1: 5, 2: 80}
    cache.insert([9] * 10 + [2, 2, 7], priority=3)  # a lower request through it lowers nothing
    assert prefix.priority == 80 and prefix.children[2].priority == 80
    assert prefix.children[2].children[7].priority == 3
    # a protected prefix survives a flood of more recent low-priority entries
    for k in range(20, 40):
        cache.insert([k] * 5, priority=4)
    assert cache.match_prefix([9] * 10 + [2, 2]).length == 12
    assert cache.match_prefix([9] * 10 + [1, 1]).length == 12  # 5 > 4: it outranks the flood too
