"""Adaptive micro-batching: requests that arrive close together share one model call.

A request waits at most `max_latency_s` for others to join it. While the model is busy with a
batch, new requests queue up, and the next batch takes as many of them as it may hold without
waiting any longer; so under load batches fill from the backlog, and a lone request is delayed
by at most the latency budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

RECENT_BATCHES = 1000
"""Batch sizes kept in `MicroBatcher.batch_sizes`; a server runs for months."""

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    enqueued_at: float


class MicroBatcher(Generic[Item, Result]):
    """`await submit(item)` runs `run_batch([... item ...])` on `executor` and returns its result.

    `run_batch` must return one result per item, in order. One batch runs at a time. The batcher
    belongs to the event loop it is first used on and starts over on another one (tests run many).
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        executor: Executor,
        *,
        max_batch_size: int,
        max_latency_s: float,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_latency_s = max(0.0, max_latency_s)
        self.batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)
        """Sizes of the most recent batches, oldest first (for tests and debugging)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Pending[Item, Result]] | None = None
        self._worker: asyncio.Task[None] | None = None

    def _ensure_worker(self) -> asyncio.Queue[_Pending[Item, Result]]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._queue is None or self._worker is None or self._worker.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work(self._queue), name="kubetune-micro-batcher")
        return self._queue

    async def submit(self, item: Item) -> Result:
        pending_queue = self._ensure_worker()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await pending_queue.put(_Pending(item, future, time.monotonic()))
        return await future

    async def _collect(
        self, pending_queue: asyncio.Queue[_Pending[Item, Result]]
    ) -> list[_Pending[Item, Result]]:
        batch = [await pending_queue.get()]
        deadline = batch[0].enqueued_at + self.max_latency_s
        while len(batch) < self.max_batch_size:
            if not pending_queue.empty():
                batch.append(pending_queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(pending_queue.get(), remaining))
            except TimeoutError:
                break
        return [entry for entry in batch if not entry.future.done()]  # callers that gave up

    async def _work(self, pending_queue: asyncio.Queue[_Pending[Item, Result]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(pending_queue)
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)}")
            except Exception as error:
                for entry in batch:
                    with contextlib.suppress(asyncio.InvalidStateError):
                        entry.future.set_exception(error)
                continue
            for entry, result in zip(batch, results, strict=True):
                with contextlib.suppress(asyncio.InvalidStateError):
                    entry.future.set_result(result)
