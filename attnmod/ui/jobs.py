"""One job at a time on the model, the others waiting in order where everyone can see them; any job can
be cancelled, waiting or running.

A running job is stopped at its next UNet call: a forward pre-hook on the UNet raises ``JobCancelled``
when the job's cancel flag is set. Every method calls the UNet, so every method stops this way, and the
library's context managers undo their hooks on the way out. A scan keeps the tiles it finished (the CLI
and the page resume it).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..dit import denoiser


class JobCancelled(Exception):
    """Raised inside a job's UNet call after its cancel button was pressed."""


@dataclass(eq=False)
class Job:
    kind: str  # "scan", "generate", ...
    owner: str  # the browser session that asked for it
    work: Callable[[Job], object]
    number: int = 0
    state: str = "waiting"  # waiting | running | done | failed | cancelled
    result: object = None
    error: BaseException | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    unet_calls: int = 0

    def post(self, event) -> None:
        """Hand something to the page (finished tiles, ...); ``drain`` takes it."""
        self.events.put(event)

    def drain(self, timeout: float = 0.2) -> list:
        """The events posted since the last call, waiting up to ``timeout`` for the first."""
        out = []
        try:
            out.append(self.events.get(timeout=timeout))
            while True:
                out.append(self.events.get_nowait())
        except queue.Empty:
            return out

    @property
    def finished(self) -> bool:
        return self.done.is_set() and self.events.empty()


class JobQueue:
    """Runs the jobs submitted for one pipeline one after another, each in its own thread."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._cv = threading.Condition()
        self._order: list[Job] = []
        self._numbers = itertools.count(1)
        self.current: Job | None = None
        self._hook = denoiser(pipe).register_forward_pre_hook(self._unet_call)  # UNet or DiT transformer

    def close(self) -> None:
        """Take the queue's UNet hook off the pipeline (the page keeps it for its whole life)."""
        self._hook.remove()

    def submit(self, kind: str, owner: str, work: Callable[[Job], object]) -> Job:
        job = Job(kind, owner, work, number=next(self._numbers))
        with self._cv:
            self._order.append(job)
        threading.Thread(target=self._run, args=(job,), daemon=True, name=f"attnmod-job-{job.number}").start()
        return job

    def cancel(self, owner: str) -> int:
        """Cancel every job of ``owner``, waiting or running; how many there were."""
        with self._cv:
            mine = [j for j in self._order if j.owner == owner]
        for j in mine:
            j.cancel.set()
        return len(mine)

    def ahead_of(self, job: Job) -> int:
        with self._cv:
            return self._order.index(job) if job in self._order else 0

    def describe(self) -> str:
        """The queue in one line, as the page shows it."""
        with self._cv:
            order = list(self._order)
        if not order:
            return "queue: idle"
        running = [f"{j.kind} #{j.number}" for j in order if j.state == "running"]
        waiting = [f"{j.kind} #{j.number}" for j in order if j.state == "waiting"]
        parts = [f"running {', '.join(running)}"] if running else []
        if waiting:
            parts.append(f"waiting {len(waiting)}: {', '.join(waiting)}")
        return "queue: " + "; ".join(parts)

    def _run(self, job: Job) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._order[0] is job)
            self.current = job
            job.state = "running"
        scheduler = self.pipe.scheduler  # a replayed recipe may switch the sampler: put it back after
        try:
            if job.cancel.is_set():
                raise JobCancelled()
            job.result = job.work(job)
            job.state = "done"
        except JobCancelled as e:
            job.error, job.state = e, "cancelled"
        except BaseException as e:  # shown on the page; the next job still runs
            job.error, job.state = e, "failed"
        finally:
            self.pipe.scheduler = scheduler
            with self._cv:
                self._order.remove(job)
                self.current = None
                self._cv.notify_all()
            job.done.set()

    def _unet_call(self, module, args):
        job = self.current
        if job is not None and threading.current_thread().name == f"attnmod-job-{job.number}":
            if job.cancel.is_set():
                raise JobCancelled()
            job.unet_calls += 1
        return None
