"""ec262: volunteer-computing MapReduce over gRPC.

Every task is computed by several strangers' workers; results stay
encrypted until the job's foreman pays, and it pays only when a majority
agree. See docs/protocol.md for the contract.
"""

import logging
import os

# gRPC's C core otherwise logs every failed TLS handshake (a port scanner, an
# impostor refused) to stderr at INFO; ec262 reports what matters itself.
# Set before gRPC loads, so only where the program has not chosen.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from ec262.api import Job, JobResult, combiner, mapper, reducer, run_job
from ec262.envelope import decrypt_data, encrypt_data
from ec262.errors import (
    AuthenticationError,
    CertificateMismatch,
    DecryptionError,
    Ec262Error,
    EncodingError,
    InsufficientCredits,
    InvalidRequest,
    JobFailed,
    NotEnoughWorkers,
    RemoteError,
    ServiceUnavailable,
    TrustError,
    UnknownTask,
)

__version__ = "0.1.0"


def run_worker(port: int = 11235, **options) -> None:
    """Run a worker in the foreground until SIGINT/SIGTERM, as `ec262 worker`
    does; `options` are the fields of `worker_service.server.WorkerConfig`
    (discovery="HOST:PORT", slots=2, allow_modules=("numpy",), ...)."""
    from worker_service.server import WorkerConfig, run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(WorkerConfig(port=port, **options))


__all__ = [
    "AuthenticationError",
    "CertificateMismatch",
    "DecryptionError",
    "Ec262Error",
    "EncodingError",
    "InsufficientCredits",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "JobResult",
    "NotEnoughWorkers",
    "RemoteError",
    "ServiceUnavailable",
    "TrustError",
    "UnknownTask",
    "__version__",
    "combiner",
    "decrypt_data",
    "encrypt_data",
    "mapper",
    "reducer",
    "run_job",
    "run_worker",
]
