"""The `Worker` gRPC servicer: proto in, one Worker call, proto out."""

from __future__ import annotations

from ec262.grpc_errors import answer_each, item_status, translate_errors
from ec262.v1 import worker_pb2 as pb
from ec262.v1 import worker_pb2_grpc
from worker_service.tasks import Task, checked_task, checked_task_id
from worker_service.worker import Worker


def _task(request: pb.AssignTaskRequest) -> Task:
    return checked_task(
        task_id=request.task_id,
        job_id=request.job_id,
        phase=request.phase,
        function=request.function,
        function_sha256=request.function_sha256,
        rows=request.rows,
        result_address=request.result_address,
        foreman_id=request.foreman_id,
        submit_token=request.submit_token,
        result_certificate=request.result_certificate,
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: Worker, *, address: str, runtime: str) -> None:
        self._worker = worker
        self._address = address
        self._runtime = runtime

    @translate_errors
    def AssignTask(self, request, context):
        self._worker.assign(_task(request))
        return pb.AssignTaskResponse(accepted=True)

    @translate_errors
    def AssignTasks(self, request, context):
        """Each task checked and taken as AssignTask would, with one
        confirmation from the discovery service for all of them."""
        checked = answer_each(request.tasks, _task, "AssignTasks")
        tasks = [task for _, task in checked if task is not None]
        taken = iter(self._worker.assign_many(tasks))
        return pb.AssignTasksResponse(
            statuses=[item_status(next(taken)) if task is not None else status
                      for status, task in checked]
        )  # fmt: skip

    @translate_errors
    def CancelTask(self, request, context):
        return self._cancel(request)

    @translate_errors
    def CancelTasks(self, request, context):
        """Each cancel carried out as CancelTask would, in order."""
        return pb.CancelTasksResponse(
            answers=[
                pb.CancelTaskAnswer(status=status, response=response)
                for status, response in answer_each(request.tasks, self._cancel, "CancelTasks")
            ]
        )

    def _cancel(self, request: pb.CancelTaskRequest) -> pb.CancelTaskResponse:
        cancelled = self._worker.cancel(
            checked_task_id(request.task_id),
            request.submit_token,
            only_queued=request.only_queued,
        )
        return pb.CancelTaskResponse(cancelled=cancelled)

    @translate_errors
    def GetStatus(self, request, context):
        snapshot = self._worker.snapshot()
        return pb.WorkerStatus(
            client_id=snapshot.client_id,
            slots=snapshot.slots,
            busy_slots=snapshot.busy_slots,
            tasks_done=snapshot.tasks_done,
            tasks_failed=snapshot.tasks_failed,
            cached_functions=snapshot.cached_functions,
            address=self._address,
            runtime=self._runtime,
        )
