"""Dynamic batching: concurrent requests for one model coalesce into one inference run.

A worker task takes the oldest waiting request, then adds more until the batch
holds max_batch_size rows or the oldest request has waited max_delay (as
Triton's max_queue_delay_microseconds). It waits only for requests known to be
coming: a request announces itself (`arrival()`) once its body has been read,
before it is parsed or decoded, so a lone request runs at once instead of paying
the delay for nothing, and a stalled upload holds no batch back.
The batch runs on a dedicated thread, never on the event loop. The waiting
queue is bounded: when it is full, new requests are refused with 503 at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from serving.errors import InferenceFailed, Unavailable

__all__ = ["BatchStats", "Arrival", "DynamicBatcher"]

log = logging.getLogger("serving.batching")


@dataclass(frozen=True)
class BatchStats:
    """What one run did, for the metrics."""

    rows: int  # batch size actually run
    queue_waits: list[float]  # seconds each request waited before the run started
    run_seconds: float  # time in the inference function


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float


class Arrival:
    """A request on its way to the batcher: counted as coming until it calls `infer` (or gives up)."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher: DynamicBatcher | None = batcher
        batcher._coming += 1

    def _leave(self) -> None:
        if self._batcher is not None:
            self._batcher._coming -= 1
            self._batcher = None

    async def infer(self, x: np.ndarray) -> np.ndarray:
        batcher = self._batcher
        assert batcher is not None, "Arrival.infer() may be called once"
        self._leave()
        return await batcher.infer(x)


class DynamicBatcher:
    """Runs `infer` (a blocking, batch-in batch-out function) on coalesced requests.

    Args:
        infer: (N, ...) float32 -> (N, ...) outputs; called on the batcher's own thread.
        max_batch_size: most rows per run; a single request may not carry more.
        max_delay_s: longest time the oldest request waits for a fuller batch.
        queue_size: most requests waiting; more are refused with Unavailable (503).
        coalesce: False runs every request alone (for comparison with batching on).
        on_batch: called with each run's BatchStats.

    `on_broken`, if set, is called (with the reason) when a run returns other than one output row
    per input row; that run's requests all fail, and none gets another's rows.
    """

    def __init__(
        self,
        name: str,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        coalesce: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self._infer = infer
        self._max_delay_s = max_delay_s
        self._queue_size = queue_size
        self._coalesce = coalesce
        self._on_batch = on_batch
        self.on_broken: Callable[[str], None] | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._closing = False
        self._held: list[_Pending] = []  # the batch being formed or run
        self._next: _Pending | None = None  # taken off the queue, did not fit: starts the next batch
        self._coming = 0  # announced requests not yet queued (see Arrival)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue(self._queue_size)
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch running now)."""
        return self._queue.qsize() if self._queue else 0

    @contextmanager
    def arrival(self) -> Iterator[Arrival]:
        """Announce a request whose body is in (being parsed); a forming batch waits (up to max_delay) for it."""
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival._leave()

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Outputs for `x` (N rows, 1 <= N <= max_batch_size), run in some batch."""
        assert self._queue is not None, "DynamicBatcher.start() was not called"
        assert 1 <= len(x) <= self.max_batch_size, f"batch of {len(x)} rows, limit {self.max_batch_size}"
        if self._closing:
            raise Unavailable(f"model {self.name!r} is shutting down; retry on another replica")
        loop = asyncio.get_running_loop()
        pending = _Pending(x, loop.create_future(), loop.time())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Unavailable(
                f"model {self.name!r} has {self._queue_size} requests waiting (the queue limit); retry later"
            ) from None
        return await pending.future

    async def close(self, timeout_s: float) -> None:
        """Refuse new requests, let waiting ones finish for up to `timeout_s`, then fail the rest."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self.depth or self._held or self._next) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left = [*self._held, *([self._next] if self._next else [])]
        while self._queue and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for pending in left:
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model {self.name!r} shut down before running the request"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            # Requests off the queue but not yet answered stay in _held (or _next), where close() finds them.
            self._held = [self._next or await self._queue.get()]
            self._next = None
            rows = len(self._held[0].x)
            deadline = self._held[0].enqueued + self._max_delay_s
            while self._coalesce and rows < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not self._coming:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if rows + len(item.x) > self.max_batch_size:
                    self._next = item  # starts the next batch
                    break
                self._held.append(item)
                rows += len(item.x)
            await self._run(self._held)
            self._held = []

    async def _run(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # a client that went away cancelled its future
        if not live:
            return
        loop = asyncio.get_running_loop()
        x = live[0].x if len(live) == 1 else np.concatenate([p.x for p in live])
        started = loop.time()
        try:
            y = await loop.run_in_executor(self._executor, self._infer, x)
        except Exception as e:
            log.exception("model %r: inference failed on a batch of %d rows", self.name, len(x))
            self._fail(live, f"model {self.name!r}: inference failed: {e}")
            return
        if not isinstance(y, np.ndarray) or y.ndim == 0 or len(y) != len(x):
            shape = list(y.shape) if isinstance(y, np.ndarray) else type(y).__name__
            reason = f"model {self.name!r} returned an output of shape {shape} for a batch of {len(x)} rows, not one row per input row"
            log.error("%s; its requests fail and the version is taken out of service", reason)
            self._fail(live, reason)
            if self.on_broken:
                self.on_broken(reason)
            return
        if self._on_batch:
            self._on_batch(BatchStats(len(x), [started - p.enqueued for p in live], loop.time() - started))
        offset = 0
        for p in live:  # each request gets its own rows, checked above to be one per input row
            n = len(p.x)
            if not p.future.done():
                p.future.set_result(y[offset : offset + n])
            offset += n

    @staticmethod
    def _fail(live: list[_Pending], message: str) -> None:
        for p in live:
            if not p.future.done():
                p.future.set_exception(InferenceFailed(message))
