"""Defaults that several programs share, each named once: where the
discovery service listens, and the environment variables that point the
programs elsewhere (docs/protocol.md sections 6-8). Message sizes are in
`ec262/limits.py`."""

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
