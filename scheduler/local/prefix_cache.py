"""A prefix KV cache keyed on token ids, with LRU eviction under a token budget.

Each entry holds a token sequence and the key/value tensors the model computed
for it. A request reuses the KV of the entry sharing its longest prefix and
computes only the rest. Cached tensors are never written to: the model extends
a cache by concatenation (new tensors), so concurrent requests that start from
the same entry cannot corrupt it or each other.

Lookup compares the prompt against every entry with one vectorised comparison
each; with a budget of tens of thousands of tokens that is a few dozen entries,
cheaper here than maintaining a radix tree in Python.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape [1, heads, T, dim]


@dataclass
class _Entry:
    tokens: torch.Tensor  # 1-D int64
    kv: KV


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    same = (a[:n] == b[:n]).to(torch.int8)
    return int(same.cumprod(0).sum())


class PrefixKVCache:
    def __init__(self, budget_tokens: int) -> None:
        self.budget = budget_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.size = 0
        self.hits_tokens = 0
        self.lookup_tokens = 0

    def match(self, tokens: list[int], limit: int) -> tuple[int, KV | None]:
        """The longest cached prefix of ``tokens`` (at most ``limit`` tokens) and its KV slices."""
        query = torch.tensor(tokens, dtype=torch.long)
        with self._lock:
            best_key, best_len = None, 0
            for key, entry in self._entries.items():
                n = common_prefix(entry.tokens, query)
                if n > best_len:
                    best_key, best_len = key, n
            best_len = min(best_len, limit)
            self.lookup_tokens += len(tokens)
            if best_key is None or best_len == 0:
                return 0, None
            self._entries.move_to_end(best_key)
            entry = self._entries[best_key]
            self.hits_tokens += best_len
            return best_len, [(k[:, :, :best_len], v[:, :, :best_len]) for k, v in entry.kv]

    def insert(self, tokens: list[int], kv: KV) -> None:
        """Keep ``tokens`` with their KV; entries that are prefixes of them are superseded."""
        n = len(tokens)
        if n == 0 or n > self.budget:
            return
        seq = torch.tensor(tokens, dtype=torch.long)
        kv = [(k[:, :, :n].detach(), v[:, :, :n].detach()) for k, v in kv]
        with self._lock:
            for key, entry in list(self._entries.items()):
                shared = common_prefix(entry.tokens, seq)
                if shared == len(entry.tokens):  # old entry is a prefix of the new one
                    self._drop(key)
                elif shared == n:  # the new one is already covered
                    self._entries.move_to_end(key)
                    return
            self._entries[self._next] = _Entry(seq, kv)
            self._next += 1
            self.size += n
            while self.size > self.budget:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.size -= len(entry.tokens)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_ratio(self) -> float:
        return self.hits_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
