"""Eviction policies: which block leaves a tier first. Chosen by the pool's spec.eviction.policy.

S3-FIFO (Yang et al., SOSP'23) keeps one-off blocks (a long prompt read once) in a small FIFO so
they leave before the blocks that came back; LRU is plain recency. Both skip pinned blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class EvictionPolicy(Protocol):
    def insert(self, key: bytes) -> None: ...
    def touch(self, key: bytes) -> None: ...
    def remove(self, key: bytes) -> None: ...
    def victim(self, evictable: Callable[[bytes], bool]) -> bytes | None: ...
    def __len__(self) -> int: ...


class LRU:
    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[bytes], bool]) -> bytes | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None


class S3FIFO:
    def __init__(self, small_ratio: float = 0.1, ghost_limit: int = 1 << 16) -> None:
        self.small: OrderedDict[bytes, None] = OrderedDict()
        self.main: OrderedDict[bytes, None] = OrderedDict()
        self.ghost: OrderedDict[bytes, None] = OrderedDict()
        self.freq: dict[bytes, int] = {}
        self.small_ratio = small_ratio
        self.ghost_limit = ghost_limit

    def __len__(self) -> int:
        return len(self.small) + len(self.main)

    def insert(self, key: bytes) -> None:
        self.freq[key] = 0
        if key in self.ghost:
            del self.ghost[key]
            self.main[key] = None  # it came back after leaving: it earned the main queue
        else:
            self.small[key] = None

    def touch(self, key: bytes) -> None:
        if key in self.freq:
            self.freq[key] = min(self.freq[key] + 1, 3)

    def remove(self, key: bytes) -> None:
        self.small.pop(key, None)
        self.main.pop(key, None)
        self.freq.pop(key, None)

    def victim(self, evictable: Callable[[bytes], bool]) -> bytes | None:
        # Bounded passes: every key is looked at a few times at most, so pinned keys cannot spin us.
        for _ in range(4 * len(self) + 1):
            small_turn = self.small and (len(self.small) >= self.small_ratio * len(self) or not self.main)
            queue = self.small if small_turn else self.main
            if not queue:
                return None
            key = next(iter(queue))
            del queue[key]
            if not evictable(key):
                queue[key] = None
                continue
            if self.freq.get(key, 0) > 0:
                if queue is self.small:
                    self.main[key] = None  # read again while small: promote
                else:
                    self.freq[key] -= 1
                    self.main[key] = None
                continue
            self.freq.pop(key, None)
            if queue is self.small:
                self.ghost[key] = None
                if len(self.ghost) > self.ghost_limit:
                    self.ghost.popitem(last=False)
            return key
        return None


def make_policy(name: str) -> EvictionPolicy:
    return {"lru": LRU, "s3fifo": S3FIFO}[name]()
