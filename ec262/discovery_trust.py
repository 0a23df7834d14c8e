"""How a client (worker, foreman, `ec262 status`) trusts a discovery
service (docs/protocol.md section 8): the certificate it was given
(`--discovery-cert`, `discovery_cert=`, $EC262_DISCOVERY_CERT: the server's
own or a CA), else the one pinned for the address in its identity file,
else, off loopback, the one presented at first contact, pinned then.

Verification is gRPC's TLS with that certificate as the only root. What
this module adds is the check before the first call: it looks at the
certificate the server presents and, when it is not the trusted one,
raises `CertificateMismatch` naming both fingerprints, at once and before
any call could spend a credit, where gRPC would only report a failed
handshake as UNAVAILABLE and the caller would retry it for a minute.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ec262 import tls
from ec262.addresses import address_is_loopback, split_address
from ec262.defaults import ENV_DISCOVERY_CERT
from ec262.errors import CertificateMismatch, ServiceUnavailable, TrustError
from ec262.identity import Pin, load_pins, save_pin

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0  # seconds for the look at the presented certificate
# gRPC's words for a failed handshake (a wrong certificate, or TLS against
# plaintext): only then is the presented certificate looked at again.
_HANDSHAKE_WORDS = ("handshake", "ssl", "tls", "verif", "socket closed", "certificate")


@dataclass(frozen=True)
class Trusted:
    pem: bytes
    source: str  # where the trust comes from, for messages

    @property
    def fingerprint(self) -> str:
        return tls.fingerprint(self.pem)


class DiscoveryTrust:
    """Channels to discovery addresses, each verified as section 8 says."""

    def __init__(
        self,
        certificate: str | os.PathLike | None = None,
        pins: Path | None = None,
        *,
        environment: bool = True,
    ) -> None:
        """`environment=False` ignores $EC262_DISCOVERY_CERT (a local
        cluster's own service is not the one it names)."""
        if environment:
            certificate = certificate or os.environ.get(ENV_DISCOVERY_CERT) or None
        self._given: Trusted | None = None
        if certificate:
            path = Path(certificate).expanduser()
            try:
                pem = path.read_bytes()
                tls.fingerprint(pem)
            except (OSError, ValueError) as error:
                raise TrustError(
                    f"discovery certificate {path} is not a readable PEM certificate: {error}"
                ) from None
            self._given = Trusted(pem, f"the discovery certificate {path}")
        self.pins = pins
        self._lock = threading.Lock()
        self._memory_pins: dict[str, Pin] = {}  # when there is no identity file

    def trusted(self, address: str) -> Trusted | None:
        if self._given is not None:
            return self._given
        pin = self._pins().get(address)
        if pin is None:
            return None
        return Trusted(pin.certificate.encode(), f"the pin in {self.pins or 'memory'}")

    def _pins(self) -> dict[str, Pin]:
        if self.pins is None:
            return self._memory_pins
        return load_pins(self.pins)

    def uses_tls(self, address: str) -> bool:
        return self.trusted(address) is not None or not address_is_loopback(address)

    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A channel to `address`: plaintext only to a loopback address this
        client has no certificate for; else TLS to the trusted certificate,
        checked now (CertificateMismatch, TrustError)."""
        with self._lock:
            trusted = self.trusted(address)
            if trusted is None and address_is_loopback(address):
                return grpc.insecure_channel(address, options=list(options))
            if trusted is None:
                trusted = self._pin_on_first_use(address)
            else:
                self._check(address, trusted)
        if tls.is_ca(trusted.pem):  # a CA: the usual hostname check applies
            return grpc.secure_channel(
                address, grpc.ssl_channel_credentials(trusted.pem), options=list(options)
            )
        return tls.peer_channel(address, trusted.pem, options)

    def _pin_on_first_use(self, address: str) -> Trusted:
        try:
            der = tls.presented_certificate(address, CHECK_TIMEOUT)
        except OSError as error:  # down: as transient as any outage
            raise ServiceUnavailable(
                f"discovery {address} is unreachable ({error}); its certificate is pinned"
                " at the first contact that answers"
            ) from None
        if der is None:
            raise TrustError(
                f"discovery {address} does not speak TLS; off loopback ec262 refuses"
                " plaintext (its secrets would cross the network in the clear)"
            )
        pin = Pin(tls.fingerprint_of_der(der), tls.pem_of_der(der).decode())
        if self.pins is None:
            self._memory_pins[address] = pin
        else:
            save_pin(self.pins, address, pin)
        logger.warning(
            "trusting discovery %s on first use: certificate sha256:%s, pinned in %s",
            address,
            pin.sha256,
            self.pins or "memory",
        )
        return Trusted(pin.certificate.encode(), f"the pin in {self.pins or 'memory'}")

    def _check(self, address: str, trusted: Trusted) -> None:
        """Raise CertificateMismatch when the server presents a certificate
        `trusted` does not cover, TrustError when it answers in plaintext.
        A server that does not answer is left to the call (and its
        retries)."""
        try:
            der = tls.presented_certificate(address, CHECK_TIMEOUT)
        except OSError:
            return
        if der is None:
            raise TrustError(
                f"discovery {address} answers in plaintext, but {trusted.source} says it"
                " serves TLS; refusing to send it anything"
            )
        if not tls.verifies(der, trusted.pem, split_address(address)[0]):
            raise CertificateMismatch(
                address, trusted.fingerprint, tls.fingerprint_of_der(der), trusted.source
            )

    def explain(self, address: str, error: grpc.RpcError) -> TrustError | None:
        """After a failed call: the trust problem behind it, if that is what
        it was (a changed certificate, TLS against plaintext); None for an
        ordinary outage, which the caller retries."""
        details = (error.details() or "").lower() if hasattr(error, "details") else ""
        if error.code() != grpc.StatusCode.UNAVAILABLE or not any(
            word in details for word in _HANDSHAKE_WORDS
        ):
            return None
        trusted = self.trusted(address)
        try:
            if trusted is not None:
                self._check(address, trusted)
                return None
            der = tls.presented_certificate(address, CHECK_TIMEOUT)
        except TrustError as problem:
            return problem
        except OSError:
            return None
        if der is None:
            return None
        return TrustError(
            f"discovery {address} serves TLS (certificate sha256:"
            f"{tls.fingerprint_of_der(der)}) but this client has no certificate for it; pass"
            " it: --discovery-cert PATH, run_job(..., discovery_cert=PATH) or"
            " $EC262_DISCOVERY_CERT"
        )
