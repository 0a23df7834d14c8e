"""Bad input to a running discovery server: a clear INVALID_ARGUMENT or
UNAUTHENTICATED, never UNKNOWN/INTERNAL, and the ledger unchanged."""

from __future__ import annotations

import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ec262.v1 import discovery_pb2 as pb
from tests.conftest import rpc_error
from tests.discovery_harness import DiscoveryHarness

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INT32_MAX = 2**31 - 1


def snapshot(discovery: DiscoveryHarness) -> tuple:
    """Everything a bad call must leave alone."""
    return (
        discovery.server.ledger.store.totals(),
        tuple(
            (
                i.credits,
                i.busy_slots,
                i.slots,
                i.address,
                i.expiry_unix,
                i.tasks_completed,
                i.tasks_failed,
                i.runtime,
            )
            for i in (discovery.info(identity) for identity in discovery.identities)
        ),
    )


@pytest.fixture
def scene(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=2) for _ in range(3)]
    task = discovery.request(foreman).tasks[0]
    return discovery, foreman, workers, task


def _register(address="127.0.0.1:4000", ttl=30, slots=1, runtime="cpython-3.11"):
    return "RegisterWorker", pb.RegisterWorkerRequest(
        address=address, ttl_seconds=ttl, slots=slots, runtime=runtime
    )


def _request(n=1, exclude=(), runtime=""):
    return "RequestTasks", pb.RequestTasksRequest(
        n=n, exclude_workers=list(exclude), runtime=runtime
    )


def _fetch(task_id):
    return "FetchKey", pb.FetchKeyRequest(task_id=task_id)


def _settle(task_id, valid=True, missing=()):
    return "SettleTask", pb.SettleTaskRequest(task_id=task_id, valid=valid, missing=list(missing))


BAD_REQUESTS = {
    "negative n": (_request(n=-1), "n must be"),
    "absurd n": (_request(n=INT32_MAX), "n must be"),
    "n just past the limit": (_request(n=1001), "n must be"),
    "exclude not a uuid": (_request(exclude=["bob"]), "exclude_workers"),
    "exclude uppercase uuid": (_request(exclude=[str(uuid.uuid4()).upper()]), "exclude_workers"),
    "exclude list too long": (
        _request(exclude=[str(uuid.uuid4()) for _ in range(10_001)]),
        "at most",
    ),
    "runtime nonsense": (_request(runtime="python"), "runtime"),
    "runtime huge": (_request(runtime="cpython-3.11" * 1000), "runtime"),
    "fetch empty task id": (_fetch(""), "task id"),
    "fetch short task id": (_fetch("abc"), "task id"),
    "fetch path traversal": (_fetch("../../etc/passwd"), "task id"),
    "fetch uppercase task id": (_fetch("A" * 32), "task id"),
    "fetch huge task id": (_fetch("a" * 100_000), "task id"),
    "settle malformed task id": (_settle("not-a-task"), "task id"),
    "settle missing not a uuid": (_settle("0" * 32, missing=["x"]), "missing"),
    "register empty address": (_register(address=""), "address"),
    "register no port": (_register(address="example.org"), "address"),
    "register empty port": (_register(address="example.org:"), "port"),
    "register no host": (_register(address=":80"), "address"),
    "register port zero": (_register(address="example.org:0"), "port"),
    "register port too big": (_register(address="example.org:65536"), "port"),
    "register port negative": (_register(address="example.org:-1"), "port"),
    "register port not a number": (_register(address="example.org:8o"), "port"),
    "register space in host": (_register(address="a b:80"), "host"),
    "register url not address": (_register(address="http://example.org:80/x"), "host"),
    "register huge address": (_register(address="a" * 1_000_000 + ":80"), "characters"),
    "register bad ipv6": (_register(address="[zz]:80"), "IPV6"),
    "register negative slots": (_register(slots=-1), "slots"),
    "register absurd slots": (_register(slots=INT32_MAX), "slots"),
    "register ttl overflow": (_register(ttl=INT32_MAX), "ttl_seconds"),
    "register bad runtime": (_register(runtime="cpython 3.11"), "runtime"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_invalid_argument_and_change_nothing(scene, case):
    discovery, foreman, workers, _task = scene
    (method, request), fragment = BAD_REQUESTS[case]
    caller = workers[0] if method in ("RegisterWorker", "FetchKey") else foreman
    before = snapshot(discovery)
    error = rpc_error(getattr(discovery.stub, method), request, metadata=caller.metadata)
    assert error.code() == INVALID, error.details()
    assert fragment.lower() in error.details().lower()
    assert len(error.details()) < 300
    assert snapshot(discovery) == before


def test_missing_naming_a_stranger_is_invalid_and_leaves_the_task_open(scene):
    discovery, foreman, _workers, task = scene
    stranger = str(uuid.uuid4())
    before = snapshot(discovery)
    _method, request = _settle(task.task_id, missing=[stranger])
    error = rpc_error(discovery.stub.SettleTask, request, metadata=foreman.metadata)
    assert error.code() == INVALID
    assert stranger in error.details()
    assert snapshot(discovery) == before
    assert len(discovery.settle(foreman, task.task_id, valid=True).key) == 16


def test_valid_ipv6_and_hostname_addresses_are_accepted(discovery):
    worker = discovery.client()
    for address in ("[::1]:11235", "localhost:1"):
        _method, request = _register(address=address)
        info = discovery.stub.RegisterWorker(request, metadata=worker.metadata)
        assert info.address == address
    # A well-formed address off loopback parses, but without a certificate
    # no foreman could trust it (docs/protocol.md section 8).
    _method, request = _register(address="worker-7.example.org:443")
    with pytest.raises(grpc.RpcError) as refused:
        discovery.stub.RegisterWorker(request, metadata=worker.metadata)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "worker-7.example.org:443" in refused.value.details()
    assert "tls_certificate" in refused.value.details()


GARBAGE_TOKENS = [
    "",
    "Bearer",
    "Bearer ",
    "Bearer :",
    "Bearer abc",
    "Bearer abc:def",
    "Bearer 00000000-0000-0000-0000-000000000000:",
    "Bearer " + "x" * 5000,
    "Basic dXNlcjpwYXNz",
    "bearer",
    "Bearer 12345678-1234-1234-1234-123456789012:" + "s" * 300,
]


@pytest.mark.parametrize("token", GARBAGE_TOKENS)
def test_garbage_bearer_tokens_are_unauthenticated(scene, token):
    discovery, _foreman, _workers, task = scene
    before = snapshot(discovery)
    for method, request in (
        _register(),
        _request(),
        _fetch(task.task_id),
        _settle(task.task_id),
        ("GetClient", pb.GetClientRequest()),
    ):
        error = rpc_error(
            getattr(discovery.stub, method), request, metadata=(("authorization", token),)
        )
        assert error.code() == UNAUTHENTICATED, (method, error.details())
        assert error.details()
    assert snapshot(discovery) == before


# -- property-based: generated messages at every RPC -----------------------


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def fuzz_target(request, tmp_path_factory):
    if request.param == "sqlite":
        location = str(tmp_path_factory.mktemp("fuzz") / "ledger.sqlite3")
    else:
        location = request.getfixturevalue("redis_server").url("fuzz:")
    harness = DiscoveryHarness.start(location)
    foreman = harness.client()
    workers = [harness.worker(slots=3) for _ in range(4)]
    tasks = [t.task_id for t in harness.request(foreman, n=2).tasks]
    yield harness, foreman, workers, tasks
    harness.stop()


ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    # An address no foreman could use (docs/protocol.md section 8), a settle
    # that contradicts the first, a second commitment.
    grpc.StatusCode.FAILED_PRECONDITION,
}
_ascii = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
_int32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def generated_call(draw, harness, foreman, workers, tasks):
    ids = [foreman.client_id, *(w.client_id for w in workers)]
    some_text = st.one_of(
        st.text(max_size=60), _ascii, st.sampled_from(ids), st.sampled_from(tasks), st.just("")
    )
    task_id = st.one_of(st.sampled_from(tasks), st.just("0" * 32), some_text)
    addresses = st.one_of(st.builds(lambda h, p: f"{h}:{p}", _ascii, _int32), some_text)
    method = draw(
        st.sampled_from(
            [
                "CreateClient",
                "RegisterWorker",
                "GetClient",
                "RequestTasks",
                "FetchKey",
                "SettleTask",
            ]
        )
    )
    if method == "CreateClient":
        request = pb.CreateClientRequest()
    elif method == "GetClient":
        request = pb.GetClientRequest()
    elif method == "RegisterWorker":
        request = pb.RegisterWorkerRequest(
            address=draw(addresses),
            ttl_seconds=draw(_int32),
            slots=draw(_int32),
            runtime=draw(st.one_of(st.just("cpython-3.11"), some_text)),
        )
    elif method == "RequestTasks":
        request = pb.RequestTasksRequest(
            n=draw(st.one_of(st.integers(-3, 5), _int32)),
            exclude_workers=draw(st.lists(some_text, max_size=5)),
            runtime=draw(st.one_of(st.just(""), st.just("cpython-3.11"), some_text)),
        )
    elif method == "FetchKey":
        request = pb.FetchKeyRequest(task_id=draw(task_id))
    else:
        request = pb.SettleTaskRequest(
            task_id=draw(task_id),
            valid=draw(st.booleans()),
            missing=draw(st.lists(some_text, max_size=4)),
        )
    who = draw(st.sampled_from([foreman, *workers, None]))
    if who is None:
        metadata = (("authorization", draw(_ascii)),)
    elif draw(st.booleans()):
        metadata = who.metadata
    else:  # right id, generated secret
        metadata = (("authorization", f"Bearer {who.client_id}:{draw(_ascii)}"),)
    return method, request, metadata


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_messages_never_break_the_server_or_the_books(fuzz_target, data):
    harness, foreman, workers, tasks = fuzz_target
    method, request, metadata = data.draw(generated_call(harness, foreman, workers, tasks))
    try:
        getattr(harness.stub, method)(request, metadata=metadata, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        assert error.details(), (method, request)
    assert code in ALLOWED, (method, request, code)
    totals = harness.server.ledger.store.totals()
    assert totals.client_credits + totals.escrowed_credits == totals.starting_credits_issued


def test_after_the_fuzzing_the_server_is_healthy_and_the_books_balance(fuzz_target):
    # Runs after the property test in file order; also meaningful alone.
    harness, foreman, workers, _tasks = fuzz_target
    health = health_pb2_grpc.HealthStub(harness.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="ec262.v1.Discovery"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    totals = harness.server.ledger.store.totals()
    balances = sum(harness.credits(identity) for identity in (foreman, *workers))
    assert balances <= totals.client_credits
    assert totals.client_credits + totals.escrowed_credits == totals.starting_credits_issued
