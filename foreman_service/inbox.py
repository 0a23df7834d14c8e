"""Where workers' results land while a job runs: which worker may submit
for which task (and with which token), and each accepted result handed to
the job engine as an event the moment it arrives."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable

from ec262.errors import PermissionDenied, UnknownTask

# (task id, worker id, ciphertext) of an accepted result.
OnResult = Callable[[str, str, str], None]
# Settled tasks whose late results are still taken, at most (the oldest
# forgotten first): every task at replication 3 leaves one (its third
# replica, withdrawn or late), about 400 bytes, so a job of a million tiny
# tasks held 400 MB of them. A late result refused once its task is
# forgotten costs its worker nothing: the commitment at the discovery
# service is what pays it.
MAX_LATE_TASKS = 65_536


class ResultInbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, dict[str, str]] = {}  # task -> worker -> token
        self._answered: dict[str, set[str]] = {}  # task -> workers that sent theirs
        # Settled tasks -> the tokens of workers that had not answered: a
        # late result is taken (and dropped), not refused, since the
        # discovery service pays for it (docs/protocol.md section 10).
        self._late: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._on_result: OnResult = lambda task_id, worker_id, ciphertext: None

    def listen(self, on_result: OnResult) -> None:
        """Where accepted results go (the engine's event queue)."""
        self._on_result = on_result

    def expect(self, task_id: str, worker_id: str, token: str) -> None:
        """Accept one result for `task_id` from this worker, with this token."""
        with self._lock:
            self._tokens.setdefault(task_id, {})[worker_id] = token
            self._answered.setdefault(task_id, set())

    def close_task(self, task_id: str) -> None:
        """No more results for this task (it is being settled)."""
        with self._lock:
            tokens = self._tokens.pop(task_id, None) or {}
            answered = self._answered.pop(task_id, None) or set()
            waiting = {w: t for w, t in tokens.items() if w not in answered}
            if waiting:
                self._late[task_id] = waiting
                if len(self._late) > MAX_LATE_TASKS:
                    self._late.popitem(last=False)

    def submit(self, task_id: str, worker_id: str, token: str, ciphertext: str) -> None:
        """A worker's result: accepted once per assigned worker, with its token."""
        with self._lock:
            tokens = self._tokens.get(task_id)
            late = self._late.get(task_id, {})
            if tokens is None and worker_id in late:
                if not secrets.compare_digest(late[worker_id], token):
                    raise PermissionDenied("wrong submit token for this task and worker")
                del late[worker_id]
                if not late:
                    del self._late[task_id]
                return  # settled already: not needed, and not refused
            if tokens is None or worker_id not in tokens:
                raise UnknownTask(f"this foreman expects no result from {worker_id} for {task_id}")
            if not secrets.compare_digest(tokens[worker_id], token):
                raise PermissionDenied("wrong submit token for this task and worker")
            answered = self._answered[task_id]
            if worker_id in answered:
                raise UnknownTask(f"a result for {task_id} from {worker_id} was already accepted")
            answered.add(worker_id)
        self._on_result(task_id, worker_id, ciphertext)

    def open_tasks(self) -> int:
        with self._lock:
            return len(self._tokens)
