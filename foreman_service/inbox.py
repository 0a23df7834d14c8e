"""Where workers' results land while a job runs: which worker may submit
for which task (and with which token), what each has sent, and a condition
the job engine waits on instead of polling."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable

from ec262.errors import PermissionDenied, UnknownTask


class ResultInbox:
    def __init__(self) -> None:
        self.changed = threading.Condition()
        self._tokens: dict[str, dict[str, str]] = {}  # task -> worker -> token
        self._results: dict[str, dict[str, str]] = {}  # task -> worker -> ciphertext
        self._arrived: dict[str, float] = {}  # task -> time of the latest result
        self.dirty: set[str] = set()  # tasks with news since the engine last looked

    def open_task(self, task_id: str, workers: Iterable[str]) -> dict[str, str]:
        """Expect one result per worker; returns each worker's submit token."""
        tokens = {worker: secrets.token_urlsafe(18) for worker in workers}
        with self.changed:
            self._tokens[task_id] = tokens
            self._results[task_id] = {}
        return tokens

    def close_task(self, task_id: str) -> None:
        with self.changed:
            self._tokens.pop(task_id, None)
            self._results.pop(task_id, None)
            self._arrived.pop(task_id, None)
            self.dirty.discard(task_id)

    def submit(self, task_id: str, worker_id: str, token: str, ciphertext: str) -> None:
        """A worker's result: accepted once per assigned worker, with its token."""
        with self.changed:
            tokens = self._tokens.get(task_id)
            if tokens is None or worker_id not in tokens:
                raise UnknownTask(f"this foreman expects no result from {worker_id} for {task_id}")
            if not secrets.compare_digest(tokens[worker_id], token):
                raise PermissionDenied("wrong submit token for this task and worker")
            results = self._results[task_id]
            if worker_id in results:
                raise UnknownTask(f"a result for {task_id} from {worker_id} was already accepted")
            results[worker_id] = ciphertext
            self._arrived[task_id] = time.monotonic()
            self.dirty.add(task_id)
            self.changed.notify_all()

    def results(self, task_id: str) -> dict[str, str]:
        with self.changed:
            return dict(self._results.get(task_id, {}))

    def open_tasks(self) -> int:
        with self.changed:
            return len(self._tokens)
