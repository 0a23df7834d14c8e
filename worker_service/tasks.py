"""A task as the worker receives it, checked before any work starts."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ec262.addresses import is_loopback, split_address
from ec262.defaults import MAX_FUNCTION_BYTES, MAX_ROWS_BYTES
from ec262.errors import InvalidRequest
from ec262.ids import is_client_id, is_task_id
from ec262.tls import check_peer_certificate
from worker_service.mapreduce import MAP, REDUCE

MAX_TOKEN_LENGTH = 512
MAX_JOB_ID_LENGTH = 128
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    job_id: str
    phase: int
    function: bytes | None  # None: use the cached payload of function_sha256
    function_sha256: str
    rows: bytes
    result_address: str
    foreman_id: str
    submit_token: str
    result_certificate: str = ""  # PEM; "" = plaintext, loopback only


def checked_task_id(task_id: str) -> str:
    """`task_id`, or InvalidRequest if it is not a task id (AssignTask's
    and CancelTask's one check of it)."""
    if not is_task_id(task_id):
        raise InvalidRequest(f"task_id {task_id[:40]!r} is not a task id (32 lowercase hex digits)")
    return task_id


def checked_task(
    *,
    task_id: str,
    job_id: str,
    phase: int,
    function: bytes,
    function_sha256: str,
    rows: bytes,
    result_address: str,
    foreman_id: str,
    submit_token: str,
    result_certificate: str = "",
) -> Task:
    """A Task, or InvalidRequest saying which field is wrong."""
    checked_task_id(task_id)
    if len(job_id) > MAX_JOB_ID_LENGTH:
        raise InvalidRequest(f"job_id is longer than {MAX_JOB_ID_LENGTH} characters")
    if phase not in (MAP, REDUCE):
        raise InvalidRequest(f"phase must be MAP (1) or REDUCE (2), not {phase}")
    if not _SHA256.fullmatch(function_sha256):
        raise InvalidRequest("function_sha256 must be 64 lowercase hex digits")
    if len(function) > MAX_FUNCTION_BYTES:
        raise InvalidRequest(
            f"function is {len(function)} bytes; at most {MAX_FUNCTION_BYTES} allowed"
        )
    if function and hashlib.sha256(function).hexdigest() != function_sha256:
        raise InvalidRequest("function_sha256 does not match the function payload")
    if not rows:
        raise InvalidRequest("rows is empty; a chunk has at least one row")
    if len(rows) > MAX_ROWS_BYTES:
        raise InvalidRequest(f"rows is {len(rows)} bytes; at most {MAX_ROWS_BYTES} allowed")
    result_host = split_address(result_address)[0]
    if result_certificate:
        check_peer_certificate(result_certificate)
    elif not is_loopback(result_host):
        raise InvalidRequest(
            f"result_address {result_address} is not loopback but no result_certificate"
            " was sent: a result goes off this machine only over TLS"
        )
    if not is_client_id(foreman_id):
        raise InvalidRequest("foreman_id is not a client id (a lowercase UUID)")
    if not submit_token or len(submit_token) > MAX_TOKEN_LENGTH:
        raise InvalidRequest(f"submit_token must be 1 to {MAX_TOKEN_LENGTH} characters")
    return Task(
        task_id=task_id,
        job_id=job_id,
        phase=phase,
        function=function or None,
        function_sha256=function_sha256,
        rows=rows,
        result_address=result_address,
        foreman_id=foreman_id,
        submit_token=submit_token,
        result_certificate=result_certificate,
    )
