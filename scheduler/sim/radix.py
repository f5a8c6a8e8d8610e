"""A radix prefix cache over token ids, shaped like SGLang's RadixCache.

Why a compressed radix tree: agent prompts are long and share long prefixes (system prompt,
earlier turns); one node per edge segment keeps matching to a few slice comparisons instead of
a Python step per token. Eviction, like SGLang's, removes whole unreferenced leaves in LRU order,
so a prefix that a running request holds (``lock``) is never evicted. LRU order uses a logical
tick, not a clock, so the cache behaves identically in virtual and real time.

``eviction="priority"`` is SGLang's ``--radix-eviction-policy priority`` (read in the 0.5.23
source, ``mem_cache/evict_policy.py`` and ``radix_cache.py``): the leaf with the lowest
``priority`` goes first, LRU among equals; an insert raises every node on its path to at
least its request's priority (a node keeps the highest priority of any request that
inserted through it; it is never lowered), and a split node inherits its child's. Not
modelled: SGLang's checkpoint of a running request splits the leaf at the prompt boundary and
ranks the prompt part one above the request's priority (so that its output goes first); here
the whole path takes the request's priority.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from collections.abc import Sequence


@dataclass(eq=False)
class RadixNode:
    key: list[int]
    parent: RadixNode | None
    children: dict[int, RadixNode] = field(default_factory=dict)
    ref: int = 0
    last_access: int = 0
    priority: int = 0


@dataclass(frozen=True)
class PrefixMatch:
    """``length`` tokens of the query are cached; ``node`` ends exactly there (lock it)."""

    length: int
    node: RadixNode


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix, by binary search over C-speed slice comparisons."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi+1] != b[:hi+1] unless hi is the end
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixCache:
    """Token-id prefix tree with a fixed token capacity.

    ``size`` counts stored tokens; ``evictable_size`` those in no locked path. Locks count
    references from a node up to the root, so locking a match protects the whole prefix.
    """

    def __init__(self, capacity: int, eviction: str = "lru") -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if eviction not in ("lru", "priority"):
            raise ValueError(f"eviction must be 'lru' or 'priority', not {eviction!r}")
        self.capacity = capacity
        self.by_priority = eviction == "priority"
        self.size = 0
        self.evictable_size = 0
        self.reset()

    def reset(self) -> None:
        """Drop everything (``/flush_cache``); like SGLang, refused while a prefix is locked."""
        if self.size != self.evictable_size:
            raise RuntimeError("cannot reset while prefixes are locked")
        self.root = RadixNode(key=[], parent=None)
        self.root.ref = 1  # the root is never evicted
        self.size = 0
        self.evictable_size = 0
        self._tick = 0
        self._lru: list[tuple[tuple[int, int], int, RadixNode]] = []  # ((priority, last access), seq, node)
        self._seq = 0

    # ---- lookup -------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int], start: PrefixMatch | None = None) -> PrefixMatch:
        """Longest cached prefix of ``tokens``; splits a node so the match ends on a node.

        With ``start``, a locked earlier match, ``tokens`` is only what follows that prefix (no
        need to copy or re-compare a long prompt); the returned length still counts from the root."""
        tick = self._next_tick()
        tokens = tokens if isinstance(tokens, list) else list(tokens)  # keys are lists: slices compare
        node, pos = (self.root, 0) if start is None else (start.node, 0)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            segment = tokens[pos:pos + len(child.key)]
            n = len(segment) if segment == child.key else _common_prefix(child.key, segment)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = tick
            self._offer(child)
            node, pos = child, pos + n
        return PrefixMatch(length=pos + (0 if start is None else start.length), node=node)

    # ---- references ---------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        cur: RadixNode | None = node  # up to the root, whose parent is None
        while cur is not None and cur is not self.root:
            if cur.ref == 0:
                self.evictable_size -= len(cur.key)
            cur.ref += 1
            cur = cur.parent

    def unlock(self, node: RadixNode) -> None:
        cur: RadixNode | None = node  # up to the root, whose parent is None
        while cur is not None and cur is not self.root:
            cur.ref -= 1
            if cur.ref < 0:
                raise RuntimeError("unlock without lock")
            if cur.ref == 0:
                self.evictable_size += len(cur.key)
                self._offer(cur)
            cur = cur.parent

    # ---- insert / evict -----------------------------------------------------------------

    def insert(self, tokens: Sequence[int], start: PrefixMatch | None = None, priority: int = 0) -> int:
        """Store ``tokens``; evicts LRU leaves to make room and, if the locked part leaves too
        little, stores only the prefix that fits. Returns how many new tokens were stored.
        ``start`` as in ``match_prefix``. ``priority``: the request's, under priority eviction
        (raises the whole path, from the root, to at least it)."""
        match = self.match_prefix(tokens, start)
        if not self.by_priority:
            priority = 0
        elif priority:
            self._raise_path(match.node, priority)
        offset = 0 if start is None else start.length  # tokens[0] sits at this depth
        missing = len(tokens) + offset - match.length
        if missing == 0:
            return 0
        over = self.size + missing - self.capacity
        if over > 0:
            self.lock(match.node)
            self.evict(over)
            self.unlock(match.node)
            missing = min(missing, self.capacity - self.size)
            if missing <= 0:
                return 0
        key = list(tokens[match.length - offset:match.length - offset + missing])
        leaf = RadixNode(key=key, parent=match.node, last_access=self._next_tick(), priority=priority)
        match.node.children[key[0]] = leaf
        self.size += len(key)
        self.evictable_size += len(key)
        self._offer(leaf)
        return len(key)

    def evict(self, n: int) -> int:
        """Free at least ``n`` tokens if unlocked leaves allow; least recently used first."""
        freed = 0
        while freed < n and self._lru:
            stamp, _, node = heapq.heappop(self._lru)
            if stamp != (node.priority, node.last_access) or not self._evictable_leaf(node):
                continue  # stale entry: touched, raised, locked, grown or already gone since pushed
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            node.parent = None
            self.size -= len(node.key)
            self.evictable_size -= len(node.key)
            freed += len(node.key)
            self._offer(parent)
        return freed

    # ---- inspection ---------------------------------------------------------------------

    def sequences(self) -> list[list[int]]:
        """Every stored root-to-leaf token sequence (tests and debugging)."""
        out: list[list[int]] = []
        stack: list[tuple[RadixNode, list[int]]] = [(self.root, [])]
        while stack:
            node, prefix = stack.pop()
            path = prefix + node.key
            if not node.children and node is not self.root:
                out.append(path)
            stack.extend((c, path) for c in node.children.values())
        return out

    # ---- internals ----------------------------------------------------------------------

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _raise_path(self, node: RadixNode, priority: int) -> None:
        cur: RadixNode | None = node  # up to the root, whose parent is None
        while cur is not None and cur is not self.root:
            if cur.priority < priority:
                cur.priority = priority
                self._offer(cur)
            cur = cur.parent

    def _evictable_leaf(self, node: RadixNode) -> bool:
        return node is not self.root and node.parent is not None and not node.children and node.ref == 0

    def _offer(self, node: RadixNode) -> None:
        """Queue ``node`` for eviction if it is an unlocked leaf now (entries go stale lazily)."""
        if self._evictable_leaf(node):
            self._seq += 1
            heapq.heappush(self._lru, ((node.priority, node.last_access), self._seq, node))

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Cut ``child`` after ``n`` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = RadixNode(key=child.key[:n], parent=parent, ref=child.ref, last_access=child.last_access,
                          priority=child.priority)
        parent.children[upper.key[0]] = upper
        child.key = child.key[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper
