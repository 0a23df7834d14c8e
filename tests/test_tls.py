"""TLS between ec262 parties on loopback (`--tls`), docs/protocol.md section 8:
certificates made once and kept, each channel accepting exactly the
certificate it was given, and a clear error where trust fails."""

from __future__ import annotations

import datetime
import os
import stat
import threading
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import ec262
from discovery_service.ledger import Ledger, LedgerConfig
from discovery_service.sqlite_store import SqliteStore
from ec262 import tls
from ec262.discovery_client import DiscoveryClient
from ec262.errors import AddressRefused, InvalidRequest, TrustError
from ec262.local_cluster import LocalCluster
from ec262.processes import announced_fingerprint
from ec262.v1 import worker_pb2, worker_pb2_grpc
from tests.job_harness import sequential, stdlib_text, sum_reducer, word_mapper
from tests.processes import start_server
from worker_service.tasks import checked_task

# -- certificates ------------------------------------------------------------------


def test_a_certificate_is_made_once_with_private_files_and_then_reused(tmp_path):
    cert, key = tmp_path / "d" / "tls-cert.pem", tmp_path / "d" / "tls-key.pem"
    made = tls.load_or_create(cert, key, tls.subject_names("127.0.0.1"))
    assert stat.S_IMODE(os.stat(cert).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    again = tls.load_or_create(cert, key, ["other.example"])
    assert again.fingerprint == made.fingerprint
    assert len(made.fingerprint) == 64 and made.fingerprint == made.fingerprint.lower()
    parsed = x509.load_pem_x509_certificate(made.certificate_pem)
    assert parsed.public_key().curve.name == "secp256r1"
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert not parsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_half_a_certificate_is_refused_rather_than_replaced(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    tls.load_or_create(cert, key, ["localhost"])
    key.unlink()
    with pytest.raises(ValueError, match="exists but"):
        tls.load_or_create(cert, key, ["localhost"])
    tls.load_or_create(tmp_path / "c2.pem", key, ["localhost"])  # a key of another
    with pytest.raises(ValueError, match="does not belong"):
        tls.load_or_create(cert, key, ["localhost"])


def _serve_health(certificate: tls.ServerCertificate) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", certificate.server_credentials())
    server.start()
    return server, f"127.0.0.1:{port}"


def _answers(address: str, pem: bytes) -> bool:
    with tls.peer_channel(address, pem) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            return False
    return True


def _issued_by(issuer: tls.ServerCertificate) -> tls.ServerCertificate:
    """A certificate signed with `issuer`'s key, as if it were a CA."""
    key = serialization.load_pem_private_key(issuer.key_pem, None)
    issuer_cert = x509.load_pem_x509_certificate(issuer.certificate_pem)
    own = tls.new_certificate(["localhost"])
    own_key = serialization.load_pem_private_key(own.key_pem, None)
    now = datetime.datetime.now(datetime.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(issuer_cert.subject)
        .issuer_name(issuer_cert.subject)
        .public_key(own_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return tls.ServerCertificate(forged.public_bytes(serialization.Encoding.PEM), own.key_pem)


def test_a_peer_channel_accepts_exactly_its_certificate():
    mine, other = tls.new_certificate(["localhost"]), tls.new_certificate(["localhost"])
    server, address = _serve_health(mine)
    try:
        assert _answers(address, mine.certificate_pem)
        assert not _answers(address, other.certificate_pem)
    finally:
        server.stop(None)
    # Signed with the trusted certificate's own key: still refused, since
    # ours are not CAs (an exact match, docs/protocol.md section 8).
    server, address = _serve_health(_issued_by(mine))
    try:
        assert not _answers(address, mine.certificate_pem)
    finally:
        server.stop(None)


def test_registered_certificates_must_be_a_servers_own():
    assert tls.check_peer_certificate(tls.new_certificate(["a"]).certificate_pem.decode())
    with pytest.raises(InvalidRequest, match="CA certificate"):
        tls.check_peer_certificate(_ca_pem())
    for garbage in ("", "not pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"):
        with pytest.raises(InvalidRequest):
            tls.check_peer_certificate(garbage)
    with pytest.raises(InvalidRequest, match="bytes"):
        tls.check_peer_certificate("x" * (tls.MAX_CERTIFICATE_BYTES + 1))


# -- the discovery service's rules about addresses -----------------------------------


def _ledger(tmp_path) -> tuple[Ledger, str]:
    ledger = Ledger(SqliteStore(tmp_path / "l.sqlite3"), LedgerConfig())
    record, _secret = ledger.create_client()
    return ledger, record.client_id


def test_addresses_no_foreman_could_use_are_refused_before_a_probe(tmp_path):
    ledger, worker = _ledger(tmp_path)
    pem = tls.new_certificate(["w"]).certificate_pem.decode()
    with pytest.raises(AddressRefused, match=r"came from 198\.51\.100\.7.*--advertise"):
        ledger.needs_probe(
            worker, address="127.0.0.1:5000", tls_certificate="", peer_host="198.51.100.7"
        )
    with pytest.raises(AddressRefused, match=r"198\.51\.100\.9:5000.*tls_certificate"):
        ledger.needs_probe(
            worker, address="198.51.100.9:5000", tls_certificate="", peer_host="198.51.100.9"
        )
    assert not ledger.needs_probe(
        worker, address="127.0.0.1:5000", tls_certificate="", peer_host="127.0.0.1"
    )
    assert ledger.needs_probe(
        worker, address="198.51.100.9:5000", tls_certificate=pem, peer_host="198.51.100.9"
    )
    ledger.register_worker(
        worker, address="198.51.100.9:5000", ttl_seconds=60, slots=1, runtime="cpython-3.11",
        tls_certificate=pem,
    )  # fmt: skip
    # Known address and certificate: no probe on a heartbeat; a new one: probed.
    assert not ledger.needs_probe(
        worker, address="198.51.100.9:5000", tls_certificate=pem, peer_host="198.51.100.9"
    )
    other = tls.new_certificate(["w"]).certificate_pem.decode()
    assert ledger.needs_probe(
        worker, address="198.51.100.9:5000", tls_certificate=other, peer_host="198.51.100.9"
    )
    ledger.store.close()


def test_a_plaintext_result_server_off_loopback_is_refused_by_the_worker():
    fields = dict(
        task_id="a" * 32, job_id="j", phase=1, function=b"", function_sha256="b" * 64,
        rows=b"[]", foreman_id="12345678-1234-1234-1234-123456789012", submit_token="t",
    )  # fmt: skip
    with pytest.raises(InvalidRequest, match="only over TLS"):
        checked_task(result_address="198.51.100.20:4000", **fields)
    assert checked_task(result_address="127.0.0.1:4000", **fields).result_certificate == ""
    pem = tls.new_certificate(["f"]).certificate_pem.decode()
    assert checked_task(result_address="198.51.100.20:4000", result_certificate=pem, **fields)


# -- servers with --tls on loopback ----------------------------------------------------


def test_discovery_with_tls_keeps_its_fingerprint_and_refuses_plaintext(tmp_path):
    store = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    args = ["discovery", "--tls", "--port", "0", "--store", store]
    with start_server(args) as server:
        printed = announced_fingerprint(server)
        assert printed == tls.fingerprint((tmp_path / tls.CERT_FILE).read_bytes())
        assert tls.fingerprint_of_der(tls.presented_certificate(server.address)) == printed
        # What `grpcurl -cacert tls-cert.pem HOST:PORT` does: the file as a
        # root, with the usual hostname check (the certificate names 127.0.0.1).
        root = grpc.ssl_channel_credentials((tmp_path / tls.CERT_FILE).read_bytes())
        with grpc.secure_channel(server.address, root) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        with DiscoveryClient(server.address) as plain, pytest.raises(TrustError) as refused:
            plain.create_client()
        assert printed in str(refused.value) and "--discovery-cert" in str(refused.value)
        trusted = DiscoveryClient(server.address, certificate=tmp_path / tls.CERT_FILE)
        with trusted:
            identity = trusted.load_or_create_identity(tmp_path / "me.json")
            assert trusted.get_client().credits == 12
    with start_server(args) as again:
        assert announced_fingerprint(again) == printed
        with DiscoveryClient(again.address, identity, certificate=tmp_path / tls.CERT_FILE) as c:
            assert c.get_client().client_id == identity.client_id


def test_a_changed_discovery_certificate_is_refused_at_once_naming_both(tmp_path):
    """The client was given a certificate; the service now shows another:
    CertificateMismatch with both fingerprints, before any call."""
    store = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    trusted = tls.load_or_create(tmp_path / "old.pem", tmp_path / "old-key.pem", ["localhost"])
    args = ["discovery", "--tls", "--port", "0", "--store", store]
    with start_server(args) as server:
        presented = announced_fingerprint(server)
        client = DiscoveryClient(server.address, certificate=tmp_path / "old.pem")
        with client, pytest.raises(ec262.CertificateMismatch) as refused:
            client.create_client()
    assert refused.value.expected == trusted.fingerprint
    assert refused.value.presented == presented
    assert trusted.fingerprint in str(refused.value) and presented in str(refused.value)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls-cluster")
    with LocalCluster(workers=3, slots=2, directory=str(directory), tls=True) as cluster:
        yield cluster


def test_a_job_runs_with_tls_on_every_channel(tls_cluster):
    data = stdlib_text(0.2)
    result = ec262.run_job(
        data,
        mapper=word_mapper,
        reducer=sum_reducer,
        discovery=tls_cluster.address,
        discovery_cert=tls_cluster.discovery_cert,
        identity=tls_cluster.foreman_identity,
        progress=False,
    )
    assert result == sequential(data, word_mapper, sum_reducer)
    # Each server answers TLS only: the workers', the discovery service's
    # (the foreman's result server is checked by the packet capture test).
    for server in [tls_cluster.discovery, *tls_cluster.workers]:
        assert tls.presented_certificate(server.address) is not None
        with grpc.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


class _Impostor(worker_pb2_grpc.WorkerServicer):
    """Listens at a worker's address with a certificate of its own."""

    def __init__(self) -> None:
        self.assigned = 0
        self.lock = threading.Lock()

    def AssignTask(self, request, context):
        with self.lock:
            self.assigned += 1
        return worker_pb2.AssignTaskResponse(accepted=True)


def test_a_server_at_a_workers_address_with_another_certificate_gets_no_task(tls_cluster):
    (victim,) = tls_cluster.add_workers(1)
    address = victim.address
    victim.kill()  # its registration stays live until its lease ends
    impostor = _Impostor()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    worker_pb2_grpc.add_WorkerServicer_to_server(impostor, server)
    own = tls.new_certificate(["localhost"])
    assert server.add_secure_port(address, own.server_credentials())
    server.start()
    try:
        with tls.peer_channel(address, own.certificate_pem) as channel:  # it can count
            worker_pb2_grpc.WorkerStub(channel).AssignTask(
                worker_pb2.AssignTaskRequest(), timeout=5
            )
        assert impostor.assigned == 1
        data = stdlib_text(0.3)
        job = ec262.Job(mapper=word_mapper, reducer=sum_reducer, chunk_bytes=16_384)
        result = job.run(
            data,
            discovery=tls_cluster.address,
            discovery_cert=tls_cluster.discovery_cert,
            identity=tls_cluster.foreman_identity,
            progress=False,
        )
        assert result == sequential(data, word_mapper, sum_reducer)
        # The foreman did pick the dead worker's address (4 workers, 3 per
        # task, many tasks), failed the handshake, and replaced it.
        assert job.stats.replicas_released >= 1
        assert impostor.assigned == 1
    finally:
        server.stop(None)


def test_the_probe_of_a_worker_address_says_what_is_wrong():
    import asyncio
    import socket

    from discovery_service.probe import probe_worker

    served, other = tls.new_certificate(["localhost"]), tls.new_certificate(["localhost"])
    server = grpc.server(futures.ThreadPoolExecutor(2))
    service = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(service, server)
    port = server.add_secure_port("127.0.0.1:0", served.server_credentials())
    server.start()
    address = f"127.0.0.1:{port}"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening
        try:
            service.set("ec262.v1.Worker", health_pb2.HealthCheckResponse.SERVING)
            asyncio.run(probe_worker(address, served.certificate_pem.decode()))
            with pytest.raises(AddressRefused, match="does not present the certificate"):
                asyncio.run(probe_worker(address, other.certificate_pem.decode()))
            with pytest.raises(AddressRefused, match="unreachable from the discovery service"):
                asyncio.run(probe_worker(nobody, served.certificate_pem.decode(), timeout=2))
            service.set("ec262.v1.Worker", health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(AddressRefused, match="does not serve tasks"):
                asyncio.run(probe_worker(address, served.certificate_pem.decode()))
        finally:
            server.stop(None)


def test_both_stores_hand_out_each_workers_registered_certificate(discovery):
    """RequestTasks, a repeat of it, and AddReplica carry the certificate
    each worker registered (SQLite and Redis)."""
    from ec262.v1 import discovery_pb2 as pb

    pems, workers = {}, []
    for number in range(4):
        worker = discovery.client()
        pem = tls.new_certificate(["localhost"]).certificate_pem.decode() if number else ""
        discovery.stub.RegisterWorker(
            pb.RegisterWorkerRequest(
                address=f"127.0.0.1:{4100 + number}", ttl_seconds=60, slots=2,
                runtime="cpython-3.11", tls_certificate=pem,
            ),
            metadata=worker.metadata,
        )  # fmt: skip
        pems[worker.client_id] = pem
        workers.append(worker)
    foreman = discovery.client()
    request = pb.RequestTasksRequest(n=1, request_id="r1")
    first = discovery.stub.RequestTasks(request, metadata=foreman.metadata)
    again = discovery.stub.RequestTasks(request, metadata=foreman.metadata)
    for reply in (first, again):
        [task] = reply.tasks
        assert {w.client_id: w.tls_certificate for w in task.workers} == {
            w.client_id: pems[w.client_id] for w in task.workers
        }
    [task] = first.tasks
    added = discovery.stub.AddReplica(
        pb.AddReplicaRequest(task_id=task.task_id), metadata=foreman.metadata
    )
    assert added.client_id and added.tls_certificate == pems[added.client_id]
    for bad, why in ((_ca_pem(), "CA certificate"), ("not a certificate", "not a PEM")):
        with pytest.raises(grpc.RpcError) as refused:  # a CA could vouch for others
            discovery.stub.RegisterWorker(
                pb.RegisterWorkerRequest(
                    address="127.0.0.1:4200", ttl_seconds=60, tls_certificate=bad
                ),
                metadata=workers[0].metadata,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert why in refused.value.details()


def _ca_pem() -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "a CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return ca.public_bytes(serialization.Encoding.PEM).decode()


def test_a_local_job_ignores_the_trust_and_addresses_set_for_another_cluster(tmp_path, monkeypatch):
    """$EC262_DISCOVERY_CERT, $EC262_HOST and $EC262_ADVERTISE name a remote
    cluster; the cluster `run_job` starts on this machine trusts by its own
    flags (its workers inherit the environment too)."""
    remote = tls.load_or_create(tmp_path / "remote.pem", tmp_path / "remote-key.pem", ["r"])
    monkeypatch.setenv("EC262_DISCOVERY_CERT", str(tmp_path / "remote.pem"))
    monkeypatch.setenv("EC262_HOST", "198.51.100.20")
    monkeypatch.setenv("EC262_ADVERTISE", "foreman.example.org")
    monkeypatch.delenv("EC262_DISCOVERY", raising=False)
    assert remote.fingerprint
    result = ec262.run_job(
        {"a": "x y x"}, mapper=word_mapper, reducer=sum_reducer, progress=False,
        identity=tmp_path / "foreman.json",
    )  # fmt: skip
    assert result == {"x": 2, "y": 1}
    assert result.stats.foreman_address.startswith("127.0.0.1:")
