"""The foreman's result inbox: late results of settled tasks are taken
(and dropped), for a bounded number of tasks, the oldest forgotten first."""

from __future__ import annotations

import pytest

from ec262.errors import PermissionDenied, UnknownTask
from foreman_service import inbox as inbox_module
from foreman_service.inbox import ResultInbox


def settled_with_one_late(inbox: ResultInbox, task_ids: list[str]) -> None:
    """Each task answered by w1 and closed while w2 is still at work."""
    for task_id in task_ids:
        inbox.expect(task_id, "w1", f"{task_id}-token1")
        inbox.expect(task_id, "w2", f"{task_id}-token2")
        inbox.submit(task_id, "w1", f"{task_id}-token1", "ciphertext")
        inbox.close_task(task_id)


def test_a_late_result_is_taken_and_dropped_and_only_once() -> None:
    inbox, arrived = ResultInbox(), []
    inbox.listen(lambda task, worker, text: arrived.append((task, worker)))
    settled_with_one_late(inbox, ["t1"])
    with pytest.raises(PermissionDenied):
        inbox.submit("t1", "w2", "forged", "ciphertext")
    inbox.submit("t1", "w2", "t1-token2", "ciphertext")
    assert arrived == [("t1", "w1")], "a late result is not handed to the job"
    with pytest.raises(UnknownTask):
        inbox.submit("t1", "w2", "t1-token2", "ciphertext")


def test_the_late_results_kept_are_bounded_and_the_oldest_go_first(monkeypatch) -> None:
    monkeypatch.setattr(inbox_module, "MAX_LATE_TASKS", 3)
    inbox = ResultInbox()
    tasks = ["t1", "t2", "t3", "t4"]
    settled_with_one_late(inbox, tasks)
    assert len(inbox._late) == 3
    with pytest.raises(UnknownTask):
        inbox.submit("t1", "w2", "t1-token2", "ciphertext")
    for task_id in tasks[1:]:
        inbox.submit(task_id, "w2", f"{task_id}-token2", "ciphertext")
    assert not inbox._late
