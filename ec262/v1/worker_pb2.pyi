from ec262.v1 import batch_pb2 as _batch_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    MAP: _ClassVar[Phase]
    REDUCE: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
MAP: Phase
REDUCE: Phase

class AssignTaskRequest(_message.Message):
    __slots__ = ("task_id", "job_id", "phase", "function", "function_sha256", "rows", "result_address", "foreman_id", "submit_token", "result_certificate")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RESULT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FOREMAN_ID_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESULT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    phase: Phase
    function: bytes
    function_sha256: str
    rows: bytes
    result_address: str
    foreman_id: str
    submit_token: str
    result_certificate: str
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., function: _Optional[bytes] = ..., function_sha256: _Optional[str] = ..., rows: _Optional[bytes] = ..., result_address: _Optional[str] = ..., foreman_id: _Optional[str] = ..., submit_token: _Optional[str] = ..., result_certificate: _Optional[str] = ...) -> None: ...

class AssignTaskResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id", "submit_token", "only_queued")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ONLY_QUEUED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    submit_token: str
    only_queued: bool
    def __init__(self, task_id: _Optional[str] = ..., submit_token: _Optional[str] = ..., only_queued: _Optional[bool] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("client_id", "slots", "busy_slots", "tasks_done", "tasks_failed", "cached_functions", "address", "runtime")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    slots: int
    busy_slots: int
    tasks_done: int
    tasks_failed: int
    cached_functions: _containers.RepeatedScalarFieldContainer[str]
    address: str
    runtime: str
    def __init__(self, client_id: _Optional[str] = ..., slots: _Optional[int] = ..., busy_slots: _Optional[int] = ..., tasks_done: _Optional[int] = ..., tasks_failed: _Optional[int] = ..., cached_functions: _Optional[_Iterable[str]] = ..., address: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class AssignTasksRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[AssignTaskRequest]
    def __init__(self, tasks: _Optional[_Iterable[_Union[AssignTaskRequest, _Mapping]]] = ...) -> None: ...

class AssignTasksResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_batch_pb2.ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[_batch_pb2.ItemStatus, _Mapping]]] = ...) -> None: ...

class CancelTasksRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[CancelTaskRequest]
    def __init__(self, tasks: _Optional[_Iterable[_Union[CancelTaskRequest, _Mapping]]] = ...) -> None: ...

class CancelTaskAnswer(_message.Message):
    __slots__ = ("status", "response")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    status: _batch_pb2.ItemStatus
    response: CancelTaskResponse
    def __init__(self, status: _Optional[_Union[_batch_pb2.ItemStatus, _Mapping]] = ..., response: _Optional[_Union[CancelTaskResponse, _Mapping]] = ...) -> None: ...

class CancelTasksResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[CancelTaskAnswer]
    def __init__(self, answers: _Optional[_Iterable[_Union[CancelTaskAnswer, _Mapping]]] = ...) -> None: ...
