"""Keeping the worker in the discovery service's pool: load or create the
identity, register, heartbeat before the lease ends, leave on shutdown, and
keep retrying with backoff while the discovery service is down (the worker
goes on serving meanwhile)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ec262.discovery_client import DiscoveryClient
from ec262.errors import AddressRefused, AuthenticationError, InvalidRequest, TrustError
from ec262.identity import Identity
from ec262.retry import backoff_delays, is_transient

logger = logging.getLogger(__name__)


class Registrar:
    def __init__(
        self,
        discovery: DiscoveryClient,
        identity_path: Path,
        *,
        advertise: str,
        slots: int,
        lease_seconds: int,
        stop: threading.Event,
        tls_certificate: str = "",
    ) -> None:
        self._discovery = discovery
        self._identity_path = identity_path
        self._advertise = advertise
        self._slots = slots
        self._lease = lease_seconds
        self._stop = stop
        self._tls_certificate = tls_certificate
        self.registered = threading.Event()
        self.identity_ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registrar", daemon=True)

    @property
    def identity(self) -> Identity | None:
        return self._discovery.identity

    def client_id(self) -> str:
        identity = self._discovery.identity
        return identity.client_id if identity else ""

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        delays = backoff_delays(initial=0.2, maximum=10.0)
        down_since_logged = False
        while not self._stop.is_set():
            try:
                if self._discovery.identity is None:
                    self._discovery.load_or_create_identity(self._identity_path)
                    self.identity_ready.set()
                info = self._discovery.register_worker(
                    address=self._advertise,
                    ttl_seconds=self._lease,
                    slots=self._slots,
                    tls_certificate=self._tls_certificate,
                )
            except Exception as error:
                wait = next(delays)
                if is_transient(error):
                    if not down_since_logged:
                        logger.warning(
                            "discovery %s unreachable; retrying with backoff",
                            self._discovery.address,
                        )
                        down_since_logged = True
                elif isinstance(error, AuthenticationError):
                    logger.error(
                        "discovery %s does not know identity %s (%s); remove that file"
                        " to start a new identity",
                        self._discovery.address,
                        self._identity_path,
                        error,
                    )
                elif isinstance(error, InvalidRequest | ValueError | AddressRefused):
                    logger.error("registration refused: %s", error)
                elif isinstance(error, TrustError):
                    logger.error("not registering: %s", error)
                else:
                    logger.exception("registration failed")
                self._stop.wait(wait)
                continue
            if not self.registered.is_set() or down_since_logged:
                logger.info(
                    "registered with discovery %s as %s at %s (%d slot(s), %d credits)",
                    self._discovery.address,
                    info.client_id,
                    self._advertise,
                    info.slots,
                    info.credits,
                )
            self.registered.set()
            down_since_logged = False
            delays = backoff_delays(initial=0.2, maximum=10.0)
            self._stop.wait(max(1.0, self._lease / 3))

    def leave(self, timeout: float = 2.0) -> None:
        """Deregister (ttl_seconds = -1), best effort, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout=timeout)
        if not self.registered.is_set():
            return
        try:
            self._discovery.leave_pool()
            logger.info("left the pool of discovery %s", self._discovery.address)
        except Exception as error:  # the lease will simply run out
            logger.warning("could not deregister (%s); the lease runs out by itself", error)
