from ec262.v1 import batch_pb2 as _batch_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientInfo(_message.Message):
    __slots__ = ("client_id", "credits", "address", "expiry_unix", "slots", "tasks_completed", "tasks_failed", "runtime", "busy_slots", "replication", "foreman_lease_seconds", "ledger_id", "trust", "trusted_after", "adaptive_replication")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_UNIX_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TASKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    BUSY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    FOREMAN_LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ID_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_AFTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_REPLICATION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    credits: int
    address: str
    expiry_unix: int
    slots: int
    tasks_completed: int
    tasks_failed: int
    runtime: str
    busy_slots: int
    replication: int
    foreman_lease_seconds: int
    ledger_id: str
    trust: int
    trusted_after: int
    adaptive_replication: bool
    def __init__(self, client_id: _Optional[str] = ..., credits: _Optional[int] = ..., address: _Optional[str] = ..., expiry_unix: _Optional[int] = ..., slots: _Optional[int] = ..., tasks_completed: _Optional[int] = ..., tasks_failed: _Optional[int] = ..., runtime: _Optional[str] = ..., busy_slots: _Optional[int] = ..., replication: _Optional[int] = ..., foreman_lease_seconds: _Optional[int] = ..., ledger_id: _Optional[str] = ..., trust: _Optional[int] = ..., trusted_after: _Optional[int] = ..., adaptive_replication: _Optional[bool] = ...) -> None: ...

class CreateClientRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateClientResponse(_message.Message):
    __slots__ = ("client_id", "secret", "info", "ledger_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    secret: str
    info: ClientInfo
    ledger_id: str
    def __init__(self, client_id: _Optional[str] = ..., secret: _Optional[str] = ..., info: _Optional[_Union[ClientInfo, _Mapping]] = ..., ledger_id: _Optional[str] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("address", "ttl_seconds", "slots", "runtime", "tls_certificate")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TLS_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    address: str
    ttl_seconds: int
    slots: int
    runtime: str
    tls_certificate: str
    def __init__(self, address: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., slots: _Optional[int] = ..., runtime: _Optional[str] = ..., tls_certificate: _Optional[str] = ...) -> None: ...

class GetClientRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RequestTasksRequest(_message.Message):
    __slots__ = ("n", "exclude_workers", "runtime", "request_id", "replication")
    N_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    n: int
    exclude_workers: _containers.RepeatedScalarFieldContainer[str]
    runtime: str
    request_id: str
    replication: int
    def __init__(self, n: _Optional[int] = ..., exclude_workers: _Optional[_Iterable[str]] = ..., runtime: _Optional[str] = ..., request_id: _Optional[str] = ..., replication: _Optional[int] = ...) -> None: ...

class WorkerRef(_message.Message):
    __slots__ = ("client_id", "address", "tls_certificate", "live_workers")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TLS_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    address: str
    tls_certificate: str
    live_workers: int
    def __init__(self, client_id: _Optional[str] = ..., address: _Optional[str] = ..., tls_certificate: _Optional[str] = ..., live_workers: _Optional[int] = ...) -> None: ...

class TaskAssignment(_message.Message):
    __slots__ = ("task_id", "workers", "expiry_unix")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_UNIX_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerRef]
    expiry_unix: int
    def __init__(self, task_id: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerRef, _Mapping]]] = ..., expiry_unix: _Optional[int] = ...) -> None: ...

class RequestTasksResponse(_message.Message):
    __slots__ = ("tasks", "credits", "replication", "live_workers", "live_networks", "diversity")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_NETWORKS_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskAssignment]
    credits: int
    replication: int
    live_workers: int
    live_networks: int
    diversity: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskAssignment, _Mapping]]] = ..., credits: _Optional[int] = ..., replication: _Optional[int] = ..., live_workers: _Optional[int] = ..., live_networks: _Optional[int] = ..., diversity: _Optional[str] = ...) -> None: ...

class FetchKeyRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class FetchKeyResponse(_message.Message):
    __slots__ = ("key", "foreman_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOREMAN_ID_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    foreman_id: str
    def __init__(self, key: _Optional[bytes] = ..., foreman_id: _Optional[str] = ...) -> None: ...

class SettleTaskRequest(_message.Message):
    __slots__ = ("task_id", "valid", "missing", "released")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    valid: bool
    missing: _containers.RepeatedScalarFieldContainer[str]
    released: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., valid: _Optional[bool] = ..., missing: _Optional[_Iterable[str]] = ..., released: _Optional[_Iterable[str]] = ...) -> None: ...

class AddReplicaRequest(_message.Message):
    __slots__ = ("task_id", "exclude_workers", "release_workers", "request_id", "runtime", "count_live")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    COUNT_LIVE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    exclude_workers: _containers.RepeatedScalarFieldContainer[str]
    release_workers: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    runtime: str
    count_live: bool
    def __init__(self, task_id: _Optional[str] = ..., exclude_workers: _Optional[_Iterable[str]] = ..., release_workers: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., runtime: _Optional[str] = ..., count_live: _Optional[bool] = ...) -> None: ...

class SettleTaskResponse(_message.Message):
    __slots__ = ("key", "credits", "quorum_sha256", "agreeing_workers", "paid_workers", "late_workers")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_SHA256_FIELD_NUMBER: _ClassVar[int]
    AGREEING_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PAID_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LATE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    credits: int
    quorum_sha256: str
    agreeing_workers: _containers.RepeatedScalarFieldContainer[str]
    paid_workers: _containers.RepeatedScalarFieldContainer[str]
    late_workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[bytes] = ..., credits: _Optional[int] = ..., quorum_sha256: _Optional[str] = ..., agreeing_workers: _Optional[_Iterable[str]] = ..., paid_workers: _Optional[_Iterable[str]] = ..., late_workers: _Optional[_Iterable[str]] = ...) -> None: ...

class CommitResultRequest(_message.Message):
    __slots__ = ("task_id", "ciphertext_sha256")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_SHA256_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    ciphertext_sha256: str
    def __init__(self, task_id: _Optional[str] = ..., ciphertext_sha256: _Optional[str] = ...) -> None: ...

class CommitResultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchKeysRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[FetchKeyRequest]
    def __init__(self, tasks: _Optional[_Iterable[_Union[FetchKeyRequest, _Mapping]]] = ...) -> None: ...

class FetchKeyAnswer(_message.Message):
    __slots__ = ("status", "response")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    status: _batch_pb2.ItemStatus
    response: FetchKeyResponse
    def __init__(self, status: _Optional[_Union[_batch_pb2.ItemStatus, _Mapping]] = ..., response: _Optional[_Union[FetchKeyResponse, _Mapping]] = ...) -> None: ...

class FetchKeysResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[FetchKeyAnswer]
    def __init__(self, answers: _Optional[_Iterable[_Union[FetchKeyAnswer, _Mapping]]] = ...) -> None: ...

class CommitResultsRequest(_message.Message):
    __slots__ = ("commitments",)
    COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    commitments: _containers.RepeatedCompositeFieldContainer[CommitResultRequest]
    def __init__(self, commitments: _Optional[_Iterable[_Union[CommitResultRequest, _Mapping]]] = ...) -> None: ...

class CommitResultsResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_batch_pb2.ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[_batch_pb2.ItemStatus, _Mapping]]] = ...) -> None: ...

class SettleTasksRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[SettleTaskRequest]
    def __init__(self, tasks: _Optional[_Iterable[_Union[SettleTaskRequest, _Mapping]]] = ...) -> None: ...

class SettleTaskAnswer(_message.Message):
    __slots__ = ("status", "response")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    status: _batch_pb2.ItemStatus
    response: SettleTaskResponse
    def __init__(self, status: _Optional[_Union[_batch_pb2.ItemStatus, _Mapping]] = ..., response: _Optional[_Union[SettleTaskResponse, _Mapping]] = ...) -> None: ...

class SettleTasksResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[SettleTaskAnswer]
    def __init__(self, answers: _Optional[_Iterable[_Union[SettleTaskAnswer, _Mapping]]] = ...) -> None: ...
