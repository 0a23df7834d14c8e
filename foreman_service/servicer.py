"""The `Foreman` gRPC servicer: workers' results into the inbox; job status out."""

from __future__ import annotations

from ec262.grpc_errors import answer_each, translate_errors
from ec262.v1 import foreman_pb2 as pb
from ec262.v1 import foreman_pb2_grpc
from foreman_service.inbox import ResultInbox
from foreman_service.stats import JobStats


class ForemanServicer(foreman_pb2_grpc.ForemanServicer):
    def __init__(self, inbox: ResultInbox, stats: JobStats) -> None:
        self._inbox = inbox
        self._stats = stats

    def _submit(self, request: pb.SubmitResultRequest) -> None:
        self._inbox.submit(
            request.task_id, request.worker_id, request.submit_token, request.ciphertext
        )

    @translate_errors
    def SubmitResult(self, request, context):
        self._submit(request)
        return pb.SubmitResultResponse()

    @translate_errors
    def SubmitResults(self, request, context):
        answers = answer_each(request.results, self._submit, "SubmitResults")
        return pb.SubmitResultsResponse(statuses=[status for status, _ in answers])

    @translate_errors
    def GetJob(self, request, context):
        stats = self._stats
        return pb.JobStatus(
            job_id=stats.job_id,
            phase=stats.phase,
            tasks_by_state=dict(stats.states),
            retries=stats.retries,
            cheaters_seen=stats.cheaters_seen,
            credits_spent=stats.credits_spent,
            credits_saved=stats.credits_saved,
            verdicts=[
                pb.TaskVerdict(task_id=task_id, **verdict)
                for task_id, verdict in list(stats.verdicts.items())
            ],
        )
