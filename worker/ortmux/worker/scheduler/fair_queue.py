"""The scheduler's one queue discipline, shared by the request batcher and the generation loop:
one FIFO per fairness key (tenant, or adapter on a worker without tenants), priority inside a key
only, round-robin across keys, and the keys active lately (for fair-share caps).

Priority is the caller's own choice, so it orders a key's items and never one key against
another: a tenant that marks everything urgent moves ahead of nobody but itself.

Not thread-safe by itself: its owner holds its own lock around every call.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    fairness_key: str
    priority: int


Item = TypeVar("Item", bound=Queued)


class FairQueue(Generic[Item]):
    def __init__(self) -> None:
        self._queues: collections.OrderedDict[str, collections.deque[Item]] = collections.OrderedDict()
        self._last_seen: dict[str, float] = {}
        self.size = 0

    def push(self, item: Item, front: bool = False) -> None:
        """Queue ``item`` behind its key's items of the same or higher priority (``front``: an
        item popped that could not run yet, back at the head of its key's queue and its key back
        at the head of the round robin)."""
        self._last_seen[item.fairness_key] = time.monotonic()
        queue = self._queues.setdefault(item.fairness_key, collections.deque())
        if front:  # as if it had never been popped: its key's turn comes first again
            queue.appendleft(item)
            self._queues.move_to_end(item.fairness_key, last=False)
        elif item.priority and queue and queue[-1].priority < item.priority:
            index = next(i for i, other in enumerate(queue) if other.priority < item.priority)
            queue.insert(index, item)
        else:
            queue.append(item)
        self.size += 1

    def pop(
        self, fits: Callable[[Item], bool] = lambda item: True, skip: set[str] | frozenset[str] = frozenset()
    ) -> Item | None:
        """The head of the next key in round-robin order whose head ``fits`` (keys in ``skip``
        left out); the key moves to the back."""
        key = next((key for key, queue in self._queues.items() if key not in skip and fits(queue[0])), None)
        if key is None:
            return None
        queue = self._queues[key]
        item = queue.popleft()
        self._queues.move_to_end(key)
        if not queue:
            del self._queues[key]
        self.size -= 1
        return item

    def remove(self, dead: Callable[[Item], bool]) -> list[Item]:
        """Take out every queued item ``dead`` says is (cancelled, past its deadline)."""
        removed = []
        for key in list(self._queues):
            queue = self._queues[key]
            kept = collections.deque(item for item in queue if not dead(item))
            removed += [item for item in queue if dead(item)]
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        self.size -= len(removed)
        return removed

    def active_keys(self, window: float) -> int:
        """Keys that queued an item within the last ``window`` seconds (older ones are forgotten)."""
        since = time.monotonic() - window
        for key in [key for key, seen in self._last_seen.items() if seen < since]:
            del self._last_seen[key]
        return len(self._last_seen)

    def __iter__(self) -> Iterator[Item]:
        for queue in self._queues.values():
            yield from queue
