"""What the decode loop sends a generation's caller (chunks, then an error or None for the end),
read either by a thread (``get``) or by an event loop (``aget``) without a thread waiting: an
open generation costs its caller no thread."""

from __future__ import annotations

import asyncio
import collections
import threading


class Events:
    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def put(self, item: object) -> None:
        """From any thread: queue ``item`` and wake the reader."""
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            loop.call_soon_threadsafe(_wake, future)

    def get(self) -> object:
        """The next item, waiting for it on this thread."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    async def aget(self) -> object:
        """The next item, waiting for it on the running event loop (one reader at a time)."""
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                self._waiter = (loop, future)
            try:
                await future
            finally:
                with self._cond:
                    if self._waiter is not None and self._waiter[1] is future:
                        self._waiter = None


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
