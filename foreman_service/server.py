"""The Foreman service a job serves on an ephemeral port while it runs."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from ec262 import serving
from ec262.addresses import join_address
from ec262.tls import ServerCertificate, new_certificate, serves_tls, subject_names
from ec262.v1 import foreman_pb2, foreman_pb2_grpc
from foreman_service.inbox import ResultInbox
from foreman_service.servicer import ForemanServicer
from foreman_service.stats import JobStats

SERVICE_NAME = foreman_pb2.DESCRIPTOR.services_by_name["Foreman"].full_name


@dataclass
class ForemanServer:
    server: grpc.Server
    address: str
    certificate: ServerCertificate | None = None

    @property
    def certificate_pem(self) -> str:
        """What workers are told to expect (AssignTaskRequest.result_certificate)."""
        return self.certificate.certificate_pem.decode() if self.certificate else ""

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


def start_foreman_server(
    inbox: ResultInbox,
    stats: JobStats,
    *,
    host: str = "127.0.0.1",
    advertise: str | None = None,
    tls: bool = False,
) -> ForemanServer:
    """The result server on an ephemeral port; TLS when `tls` or off
    loopback, with a certificate made for this job alone: workers learn it
    from AssignTask, so it needs no file and no stable fingerprint."""
    certificate = new_certificate(subject_names(host, advertise)) if serves_tls(host, tls) else None
    server = serving.new_server(max_workers=8)
    foreman_pb2_grpc.add_ForemanServicer_to_server(ForemanServicer(inbox, stats), server)
    serving.add_standard_services(server, [SERVICE_NAME])
    port = serving.bind(server, host, 0, certificate)
    server.start()
    return ForemanServer(server, join_address(advertise or host, port), certificate)
