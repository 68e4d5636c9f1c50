"""The store's single writer thread: every SQLite write of the collector goes through it.

Work is gathered for `batch_s` and run in one transaction, then each caller's asyncio future
is resolved (ingest acks a report only after the commit that holds it). A failed commit is
rolled back and counted; the callers see the error and agents replay what was not acked.
"""

from __future__ import annotations

import asyncio
import collections
import threading

from modtrack.collector.records import StepRow
from modtrack.collector.store.sqlite import Store


class StoreWriter:
    """The single writer thread: gathers work for `batch_s`, runs it in one transaction,
    commits, then resolves each caller's asyncio future (ingest acks only after that)."""

    # 0.05 s. At 0.2 s one commit (one fsync) mostly held every rank's message of a flush (senders send every
    # 0.25 s): the writer's CPU per training step of a 2-rank job 0.20-0.28 -> 0.15-0.18 ms. But an ack waits for its
    # commit, and a caller waiting for it waits the window: 43 ingest, store and API tests took 24 s instead of 14.
    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, batch_s: float = 0.05):
        self.store = store
        self.loop = loop
        self.batch_s = batch_s
        self.errors = 0  # failed commits (each rolled back)
        # Work goes on a deque and the thread is woken only when it sleeps: a queue.Queue put takes a lock and
        # notifies a Condition for every report and every evaluated step, on the loop and the evaluation thread.
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._hurry = threading.Event()  # cuts the batch window short: a stream ending, the writer closing
        self._thread = threading.Thread(target=self._run, name="modtrack-store-writer", daemon=True)
        self._thread.start()

    def steps(self, rows: list[StepRow]) -> asyncio.Future:
        return self._put(("steps", rows))

    def call(self, fn, *args) -> asyncio.Future:
        """Run store method `fn(*args)` in the next transaction."""
        return self._put(("call", (fn, args)))

    def _put(self, item) -> asyncio.Future:
        fut = self.loop.create_future()
        self._add((item, fut))
        return fut

    def call_threadsafe(self, fn, *args) -> None:
        """From a thread other than the loop's: fire and forget."""
        self._add((("call", (fn, args)), None))

    def _add(self, item) -> None:
        self._queue.append(item)  # deque.append is atomic
        if not self._wake.is_set():
            self._wake.set()

    def hurry(self) -> None:
        """Commit what is queued now, without sleeping out the batch window (a stream waits for its last acks)."""
        self._hurry.set()

    def close(self) -> None:
        """Commits what is queued, then ends the thread."""
        self._add(None)
        self.hurry()
        self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            self._wake.wait()
            # Sleep out the batch window (unless hurried), then take what came: puts in the window wake no one.
            self._hurry.wait(self.batch_s)
            self._hurry.clear()
            self._wake.clear()  # before taking: what comes after this wakes the next round
            batch: list = []
            while self._queue:
                item = self._queue.popleft()
                if item is None:
                    stop = True
                    break
                batch.append(item)
            if batch:
                self._commit(batch)
        self.store.close()

    def _commit(self, batch) -> None:
        conn = self.store.conn()
        error = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            rows = []  # consecutive reports go in one executemany; order is kept
            for (kind, payload), _ in batch:
                if kind == "steps":
                    rows.extend(payload)
                    continue
                if rows:
                    self.store.insert_steps(rows)
                    rows = []
                fn, args = payload
                fn(*args)
            if rows:
                self.store.insert_steps(rows)
            conn.execute("COMMIT")
        except Exception as exc:  # keep serving; the callers see the error, agents replay
            error = exc
            self.errors += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        futures = [fut for _, fut in batch if fut is not None]
        if futures:  # one wake-up of the loop per commit, not one per report
            self.loop.call_soon_threadsafe(_resolve, futures, error)


def _resolve(futures: list[asyncio.Future], error) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
