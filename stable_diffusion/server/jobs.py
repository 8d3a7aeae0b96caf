"""One worker thread that owns the model and runs jobs one at a time, in submission order.

A job is a function of its `Job` (which it uses to report progress and to learn whether to
stop). Requests wait on the job's future; the queue holds at most `max_queue` jobs besides
the running one, and refuses more (`QueueFull`, HTTP 503)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """The client went away: the job stopped after its current step, its work discarded."""


class Job:
    def __init__(self, task: Callable[[Job], Any]):
        self.task = task
        self.future: Future = Future()
        self.interrupted = False  # /interrupt: stop the job, keep what was made
        self.skipped = False  # /skip: stop the current batch, go on with the next
        self.cancelled = False  # the client disconnected
        self.started_at: float | None = None
        self.batch_no = 0
        self.batch_count = 1
        self.sampling_step = 0
        self.sampling_steps = 0
        self.latent: np.ndarray | None = None  # the first image's latent, for the preview

    def start_batch(self, batch_no: int, batch_count: int) -> None:
        self.batch_no, self.batch_count = batch_no, batch_count
        self.sampling_step, self.sampling_steps = 0, 0
        self.skipped = False

    def step(self, step: int, steps: int, latents: Any) -> bool:
        """Record a finished step; whether the job must stop here."""
        self.latent = np.array(latents[0])
        self.sampling_step, self.sampling_steps = step, steps
        return self.interrupted or self.skipped or self.cancelled

    @property
    def progress(self) -> float:
        if not self.sampling_steps:
            return self.batch_no / self.batch_count
        done = self.batch_no + self.sampling_step / self.sampling_steps
        return min(done / self.batch_count, 1.0)


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="sd-worker", daemon=True)
        self._thread.start()

    def submit(self, task: Callable[[Job], Any], *, queue_limit: bool = True) -> Job:
        job = Job(task)
        with self._lock:
            busy = len(self._waiting) + (self.current is not None)
            if queue_limit and busy > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({self.max_queue} jobs waiting besides the running "
                    "one, --max-queue); retry later"
                )
            self._waiting.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it waits, stop it after its step if it runs."""
        job.cancelled = True
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupted = True

    def skip(self) -> None:
        job = self.current
        if job is not None:
            job.skipped = True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._lock.wait()
                job = self._waiting.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                self.current = job
            job.started_at = time.monotonic()
            try:
                job.future.set_result(job.task(job))
            except Exception as e:  # handed to the request that waits for it
                job.future.set_exception(e)
            finally:
                self.current = None
