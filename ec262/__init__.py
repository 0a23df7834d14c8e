"""ec262: volunteer-computing MapReduce over gRPC.

Every task is computed by several strangers' workers; results stay
encrypted until the job's foreman pays, and it pays only when a majority
agree. See PROTOCOL.md for the contract.
"""

from ec262.envelope import decrypt_data, encrypt_data
from ec262.errors import (
    AuthenticationError,
    DecryptionError,
    Ec262Error,
    EncodingError,
    InsufficientCredits,
    InvalidRequest,
    ServiceUnavailable,
    UnknownTask,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "DecryptionError",
    "Ec262Error",
    "EncodingError",
    "InsufficientCredits",
    "InvalidRequest",
    "ServiceUnavailable",
    "UnknownTask",
    "__version__",
    "decrypt_data",
    "encrypt_data",
]
