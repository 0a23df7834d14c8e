"""ec262: volunteer-computing MapReduce over gRPC.

Every task is computed by several strangers' workers; results stay
encrypted until the job's foreman pays, and it pays only when a majority
agree. See PROTOCOL.md for the contract.
"""

from ec262.errors import (
    AuthenticationError,
    Ec262Error,
    InsufficientCredits,
    InvalidRequest,
    ServiceUnavailable,
    UnknownTask,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Ec262Error",
    "InsufficientCredits",
    "InvalidRequest",
    "ServiceUnavailable",
    "UnknownTask",
    "__version__",
]
