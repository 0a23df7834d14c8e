"""Defaults and limits that several programs share, each named once: where
the discovery service listens, the environment variables that point the
programs elsewhere (docs/protocol.md sections 6-8), and message sizes.

Message sizes: the largest result a sandbox may return decides the gRPC
message limit of every channel and server: its envelope's Base64 text
(SubmitResult) must fit, with room for the request's other fields. A
result over the cap is an error result (`ResultTooLarge`) that reaches the
foreman, never a message gRPC drops. docs/protocol.md section 5.
"""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 26262  # the discovery service's
DEFAULT_DISCOVERY = f"{DEFAULT_HOST}:{DEFAULT_PORT}"

# Environment variables read by run_job, the CLI and the worker.
ENV_DISCOVERY = "EC262_DISCOVERY"  # HOST:PORT of the discovery service
ENV_DISCOVERY_CERT = "EC262_DISCOVERY_CERT"  # its certificate (or a CA), PEM file
ENV_IDENTITY = "EC262_IDENTITY"  # the identity file
ENV_HOST = "EC262_HOST"  # where a foreman's result server listens
ENV_ADVERTISE = "EC262_ADVERTISE"  # the address workers dial for it

# Message sizes.
# The canonical JSON of one task's result, at most.
MAX_RESULT_BYTES = 48 * 1024 * 1024
# AssignTask: one chunk's canonical rows, and one dill function payload.
MAX_ROWS_BYTES = MAX_RESULT_BYTES
MAX_FUNCTION_BYTES = 16 * 1024 * 1024
# ids, tokens, addresses and protobuf framing around the big fields
_MESSAGE_SLACK = 1024 * 1024
# version byte, synthetic IV, at most one block of padding, HMAC tag
_ENVELOPE_OVERHEAD = 1 + 16 + 16 + 32


def sealed_text_length(plaintext_bytes: int) -> int:
    """Characters of the Base64 envelope of a plaintext of this size."""
    return 4 * -(-(plaintext_bytes + _ENVELOPE_OVERHEAD) // 3)


MAX_MESSAGE_BYTES = (
    max(sealed_text_length(MAX_RESULT_BYTES), MAX_ROWS_BYTES + MAX_FUNCTION_BYTES) + _MESSAGE_SLACK
)

# Batch calls (docs/protocol.md section 2, batch calls): the most items one
# may carry (the services refuse more), and the bytes of rows or results a
# sender packs into one (an item bigger than that alone still goes, alone).
MAX_BATCH_ITEMS = 256
BATCH_BYTES = 4 * 1024 * 1024
