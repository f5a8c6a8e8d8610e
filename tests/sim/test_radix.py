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
