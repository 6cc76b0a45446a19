"""The one worker of ``lcm-kit serve``: jobs run one at a time on one thread, and a client's newer job replaces its
older ones still waiting.

Why one thread: a diffusers pipeline is not safe to call from two threads at once (the scheduler keeps its step
index, the fast path its caches), and on one device two calls would only slow each other down. Why latest wins: the
page sends a request on every keystroke; the image of a prompt the user has already typed past is worth nothing, so
a slow step must not queue a backlog. Each client keeps at most one waiting job, so the queue never holds more jobs
than there are clients, and a client's newest job waits behind at most one job of every other client.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future


class LatestWinsWorker:
    """Runs ``run(job)`` for submitted jobs on one daemon thread.

    ``submit(client, job)`` returns a :class:`concurrent.futures.Future`. If ``client`` already has a job waiting,
    that job's future is cancelled (it never runs) and the new job takes its place in the queue; a job already
    running finishes. Clients are served in the order their waiting job was first queued, so none starves.
    ``initializer`` runs once on the worker thread before any job (e.g. ``torch.set_num_threads``, which is per
    thread)."""

    def __init__(self, run: Callable, initializer: Callable[[], None] | None = None,
                 name: str = "lcm-kit-serve-worker"):
        self._run = run
        self._initializer = initializer
        self._waiting: OrderedDict[Hashable, tuple[object, Future]] = OrderedDict()
        self._condition = threading.Condition()
        self._closed = False
        self.stats = {"completed": 0, "failed": 0, "superseded": 0, "dropped": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, client: Hashable, job) -> Future:
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise RuntimeError("the worker is closed")
            older = self._waiting.get(client)
            if older is not None and older[1].cancel():
                self.stats["superseded"] += 1
            self._waiting[client] = (job, future)  # an existing key keeps its place in the queue
            self._condition.notify()
        return future

    def drop(self, client: Hashable) -> bool:
        """Cancel ``client``'s waiting job (it sent a request that failed its checks, or it left); True if one was
        waiting."""
        with self._condition:
            waiting = self._waiting.pop(client, None)
        if waiting is not None and waiting[1].cancel():
            self.stats["dropped"] += 1
            return True
        return False

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel every waiting job, let the running one finish and stop the thread."""
        with self._condition:
            self._closed = True
            waiting = list(self._waiting.values())
            self._waiting.clear()
            self._condition.notify_all()
        for _, future in waiting:
            future.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                _, (job, future) = self._waiting.popitem(last=False)
            if not future.set_running_or_notify_cancel():  # cancelled by its waiter meanwhile
                continue
            try:
                result = self._run(job)
            except Exception as err:  # noqa: BLE001 - a failing job is its client's error, never the worker's end
                self.stats["failed"] += 1
                future.set_exception(err)
            else:
                self.stats["completed"] += 1
                future.set_result(result)
