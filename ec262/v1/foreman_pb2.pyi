from ec262.v1 import batch_pb2 as _batch_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitResultRequest(_message.Message):
    __slots__ = ("task_id", "worker_id", "submit_token", "ciphertext")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    worker_id: str
    submit_token: str
    ciphertext: str
    def __init__(self, task_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., submit_token: _Optional[str] = ..., ciphertext: _Optional[str] = ...) -> None: ...

class SubmitResultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "phase", "tasks_by_state", "retries", "cheaters_seen", "credits_spent", "verdicts", "credits_saved")
    class TasksByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TASKS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    CHEATERS_SEEN_FIELD_NUMBER: _ClassVar[int]
    CREDITS_SPENT_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_SAVED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    phase: str
    tasks_by_state: _containers.ScalarMap[str, int]
    retries: int
    cheaters_seen: int
    credits_spent: int
    verdicts: _containers.RepeatedCompositeFieldContainer[TaskVerdict]
    credits_saved: int
    def __init__(self, job_id: _Optional[str] = ..., phase: _Optional[str] = ..., tasks_by_state: _Optional[_Mapping[str, int]] = ..., retries: _Optional[int] = ..., cheaters_seen: _Optional[int] = ..., credits_spent: _Optional[int] = ..., verdicts: _Optional[_Iterable[_Union[TaskVerdict, _Mapping]]] = ..., credits_saved: _Optional[int] = ...) -> None: ...

class TaskVerdict(_message.Message):
    __slots__ = ("task_id", "agreed", "disagreed", "late", "silent")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGREED_FIELD_NUMBER: _ClassVar[int]
    DISAGREED_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    SILENT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agreed: _containers.RepeatedScalarFieldContainer[str]
    disagreed: _containers.RepeatedScalarFieldContainer[str]
    late: _containers.RepeatedScalarFieldContainer[str]
    silent: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., agreed: _Optional[_Iterable[str]] = ..., disagreed: _Optional[_Iterable[str]] = ..., late: _Optional[_Iterable[str]] = ..., silent: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitResultsRequest(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResultRequest]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResultRequest, _Mapping]]] = ...) -> None: ...

class SubmitResultsResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_batch_pb2.ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[_batch_pb2.ItemStatus, _Mapping]]] = ...) -> None: ...
