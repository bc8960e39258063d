"""Text deltas handed from the generating thread to whoever reads them (a thread or an event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import cast

from kubetune_components.serving.requests import Completion

_END = object()


class TextStream:
    """Text deltas of one request as they are generated (iterate), then `result`."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        """Set once generation has ended (`result` or `error` is then final)."""
        self.result: Completion | None = None
        self.error: BaseException | None = None

    def put(self, delta: str) -> None:
        self._queue.put(delta)

    def close(self, result: Completion | None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self._queue.put(_END)
        self.finished.set()

    def __iter__(self) -> Iterator[str]:
        try:
            while (item := self._queue.get()) is not _END:
                yield cast(str, item)
        finally:
            self.cancelled.set()
        if self.error is not None:
            raise self.error


class AsyncTextStream:
    """`TextStream` for an event loop: the generating thread hands deltas over with call_soon_threadsafe."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.result: Completion | None = None
        self.error: BaseException | None = None

    def put(self, delta: str) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def close(self, result: Completion | None, error: BaseException | None = None) -> None:
        def finish() -> None:
            self.result, self.error = result, error
            self._queue.put_nowait(_END)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(finish)

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while (item := await self._queue.get()) is not _END:
                yield cast(str, item)
        finally:
            self.cancelled.set()
        if self.error is not None:
            raise self.error
