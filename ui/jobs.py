"""The server's training runs: one at a time, visible to every page, stoppable from any.

A training run belongs to the server, not to the page that started it: reloading the page or
closing the browser leaves it running, and any page (after a reload, or another visitor's) can
find it here by id, watch it and stop it. This is why the list is a module global, shared by
every session on purpose (per-visitor things live in `gr.State`). One run at a time, because
all runs share the one accelerator with each other and with the generation jobs.
"""

from __future__ import annotations

import atexit
import threading
import uuid
from collections.abc import Callable

from sdlora.errors import SdloraError
from sdlora.ui.training import TrainJob

KEEP_FINISHED = 8  # finished runs kept for pages that still show them


class Busy(SdloraError):
    """A run is going already; `job_id` names it so that the page can offer to watch it."""

    def __init__(self, job_id: str, job: TrainJob):
        status = job.status()
        super().__init__(
            f"**{job.settings.get('name', 'a run')}** is training now on {job.label} (step "
            f"{status.step} of {status.total}); one run at a time: watch it, wait, or stop it"
        )
        self.job_id = job_id


class Jobs:
    """Training runs by id; `start` refuses a second one while one runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # start() checks and adds in one step
        self._jobs: dict[str, TrainJob] = {}

    def start(self, launch: Callable[[], TrainJob]) -> str:
        """Run `launch()` unless a run is going (then raise Busy); return the new run's id."""
        with self._lock:
            for job_id, job in self._jobs.items():
                if job.status().running:
                    raise Busy(job_id, job)
            for old in list(self._jobs)[: -KEEP_FINISHED or None]:
                del self._jobs[old]  # all finished: pages that watched them have seen the end
            job_id = uuid.uuid4().hex[:12]
            self._jobs[job_id] = launch()
            return job_id

    def get(self, job_id: str | None) -> TrainJob | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def running(self) -> str | None:
        """The id of the run that is going, if any."""
        with self._lock:
            for job_id, job in self._jobs.items():
                if job.status().running:
                    return job_id
        return None

    def stop_all(self) -> None:
        """Stop every run (the server is going down: no page could reach them any more)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stop()


JOBS = Jobs()
atexit.register(JOBS.stop_all)
