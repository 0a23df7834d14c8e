"""A small Foreman servicer for worker tests: it records each worker's
SubmitResult, enforcing the submit token, so tests can wait for results."""

from __future__ import annotations

import threading

import grpc

from ec262 import serving
from ec262.v1 import batch_pb2, foreman_pb2, foreman_pb2_grpc

_MESSAGES = {
    grpc.StatusCode.NOT_FOUND: "no such assignment",
    grpc.StatusCode.PERMISSION_DENIED: "wrong submit token",
}


class RecordingForeman(foreman_pb2_grpc.ForemanServicer):
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._tokens: dict[tuple[str, str], str] = {}
        self.results: dict[tuple[str, str], str] = {}
        self.rejected: list[tuple[str, str, str]] = []

    def expect(self, task_id: str, worker_ids, token: str) -> None:
        with self._changed:
            for worker_id in worker_ids:
                self._tokens[(task_id, worker_id)] = token

    def _take(self, request) -> grpc.StatusCode:
        key = (request.task_id, request.worker_id)
        with self._changed:
            token = self._tokens.get(key)
            if token is None or key in self.results:
                self.rejected.append((*key, "NOT_FOUND"))
                return grpc.StatusCode.NOT_FOUND
            if token != request.submit_token:
                self.rejected.append((*key, "PERMISSION_DENIED"))
                return grpc.StatusCode.PERMISSION_DENIED
            self.results[key] = request.ciphertext
            self._changed.notify_all()
        return grpc.StatusCode.OK

    def SubmitResult(self, request, context):
        code = self._take(request)
        if code != grpc.StatusCode.OK:
            context.abort(code, _MESSAGES[code])
        return foreman_pb2.SubmitResultResponse()

    def SubmitResults(self, request, context):
        statuses = []
        for item in request.results:
            code = self._take(item)
            statuses.append(
                batch_pb2.ItemStatus()
                if code == grpc.StatusCode.OK
                else batch_pb2.ItemStatus(code=code.value[0], message=_MESSAGES[code])
            )
        return foreman_pb2.SubmitResultsResponse(statuses=statuses)

    def wait_for(self, task_id: str, count: int, timeout: float = 60.0) -> dict[str, str]:
        """worker_id -> ciphertext once `count` workers have submitted."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: sum(1 for t, _ in self.results if t == task_id) >= count, timeout
            )
            found = {w: c for (t, w), c in self.results.items() if t == task_id}
        assert done, f"only {len(found)} of {count} results for task {task_id}"
        return found


def start_foreman() -> tuple[grpc.Server, str, RecordingForeman]:
    servicer = RecordingForeman()
    server = serving.new_server(max_workers=8)
    foreman_pb2_grpc.add_ForemanServicer_to_server(servicer, server)
    port = serving.bind(server, "127.0.0.1", 0)
    server.start()
    return server, f"127.0.0.1:{port}", servicer
