"""Certificates and TLS channels between ec262 parties (docs/protocol.md
section 8).

There is no public CA between strangers' machines: each server makes its
own self-signed certificate, and a client trusts exactly the certificate
the discovery service handed it (or, for the discovery service itself, the
one it was given or pinned). The crypto is gRPC's own TLS and
`cryptography`'s certificate builder; nothing here encrypts anything.

Exact match: our certificates are made with `CA:FALSE`, so used as the one
root of a channel they verify only themselves (BoringSSL refuses an issuer
that is not a CA). A peer certificate that is a CA is refused where it is
registered (`check_peer_certificate`), so no party can present another
certificate under the one it registered. Hostnames are not checked between
ec262 parties: a channel names one of the certificate's own names
(`grpc.ssl_target_name_override`), because a worker behind NAT or on a
wildcard address is reached by an address its certificate need not list.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import ipaddress
import os
import socket
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ec262.addresses import is_loopback, is_wildcard, outgoing_address, split_address
from ec262.errors import InvalidRequest

CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"
CERTIFICATE_DAYS = 3650  # a stable fingerprint matters more than rotation here
MAX_CERTIFICATE_BYTES = 16 * 1024  # a PEM certificate a peer may register
ALWAYS_NAMED = ("localhost", "127.0.0.1")  # every certificate we make names these
PROBE_TIMEOUT = 5.0


def serves_tls(host: str, forced: bool = False) -> bool:
    """A server bound to anything but loopback serves TLS only."""
    return forced or not is_loopback(host)


def _der(certificate_pem: bytes | str) -> bytes:
    pem = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def fingerprint(certificate_pem: bytes | str) -> str:
    """64 lowercase hex digits: the SHA-256 of the DER certificate."""
    return hashlib.sha256(_der(certificate_pem)).hexdigest()


def fingerprint_of_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class ServerCertificate:
    certificate_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate_pem)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.certificate_pem)])


def machine_names() -> list[str]:
    """This machine's name and addresses, for a server on a wildcard address."""
    names = [socket.gethostname(), socket.getfqdn()]
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.append(str(info[4][0]))
    with contextlib.suppress(OSError):
        names.append(outgoing_address("192.0.2.1"))  # the default route's source
    return names


def subject_names(host: str, advertise: str | None = None) -> list[str]:
    """What a server's certificate names: its advertised or bound host (the
    machine's names and addresses when bound to a wildcard), then
    `localhost` and `127.0.0.1`."""
    names = [advertise] if advertise else []
    names += machine_names() if is_wildcard(host) else [host.strip("[]")]
    return list(dict.fromkeys(n for n in [*names, *ALWAYS_NAMED] if n))


def new_certificate(names: Sequence[str]) -> ServerCertificate:
    """A self-signed ECDSA P-256 certificate for `names` (DNS names or IP
    addresses), not a CA, valid for CERTIFICATE_DAYS."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ec262 {names[0]}"[:64])])
    alternatives: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name.split("%")[0])))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return ServerCertificate(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def load_or_create(cert_path: Path, key_path: Path, names: Sequence[str]) -> ServerCertificate:
    """The certificate at `cert_path`/`key_path`, made there (mode 0600)
    when neither exists, so a server keeps one fingerprint across restarts.
    Only one of the two existing is an error: a new key would silently
    change the fingerprint that clients pinned."""
    cert_path, key_path = Path(cert_path).expanduser(), Path(key_path).expanduser()
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert != have_key:
        present, absent = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise ValueError(
            f"TLS: {present} exists but {absent} does not; restore it, or remove both"
            " to make a new certificate (clients that pinned the old one will refuse it)"
        )
    if not have_cert:
        made = new_certificate(names)
        _write_private(key_path, made.key_pem)
        _write_private(cert_path, made.certificate_pem)
        return made
    certificate_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as error:
        raise ValueError(f"TLS: {cert_path} or {key_path} is not PEM: {error}") from None
    if certificate.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"TLS: the key in {key_path} does not belong to {cert_path}")
    return ServerCertificate(certificate_pem, key_pem)


def server_certificate(
    host: str,
    *,
    forced: bool,
    cert_path: str | os.PathLike | None,
    key_path: str | os.PathLike | None,
    directory: Path,
    advertise: str | None = None,
) -> ServerCertificate | None:
    """A server's certificate when it serves TLS (off loopback, or
    `--tls`), else None: `--tls-cert`/`--tls-key`, by default
    CERT_FILE/KEY_FILE in `directory`, made on first start."""
    if not serves_tls(host, forced):
        return None
    directory = Path(directory).expanduser()
    return load_or_create(
        Path(cert_path) if cert_path else directory / CERT_FILE,
        Path(key_path) if key_path else directory / KEY_FILE,
        subject_names(host, advertise),
    )


@functools.lru_cache(maxsize=256)  # checked per AssignTask and registration
def check_peer_certificate(certificate_pem: str) -> str:
    """A certificate a worker registers: PEM, one certificate, its own (not a
    CA, which could vouch for others). Returns it as given."""
    if len(certificate_pem) > MAX_CERTIFICATE_BYTES:
        raise InvalidRequest(
            f"tls_certificate is {len(certificate_pem)} bytes; at most {MAX_CERTIFICATE_BYTES}"
        )
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError:
        raise InvalidRequest("tls_certificate is not a PEM certificate") from None
    with contextlib.suppress(x509.ExtensionNotFound):
        if certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise InvalidRequest(
                "tls_certificate is a CA certificate; register the server's own certificate"
            )
    return certificate_pem


def is_ca(certificate_pem: bytes | str) -> bool:
    pem = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    try:
        extension = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
            x509.BasicConstraints
        )
    except x509.ExtensionNotFound:
        return False
    return bool(extension.value.ca)


def target_name(certificate_pem: bytes | str) -> str:
    """A name the certificate itself carries, for the channel to check it
    against instead of the address dialled."""
    pem = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    certificate = x509.load_pem_x509_certificate(pem)
    with contextlib.suppress(x509.ExtensionNotFound):
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for name in [*names.get_values_for_type(x509.DNSName)]:
            return name
        for address in names.get_values_for_type(x509.IPAddress):
            return str(address)
    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else "localhost"


# -- channels ----------------------------------------------------------------------


def peer_credentials(
    certificate_pem: bytes | str,
) -> tuple[grpc.ChannelCredentials, list[tuple[str, object]]]:
    """Credentials and channel options (for `grpc` or `grpc.aio`) that
    accept only a server presenting exactly this (non-CA) certificate."""
    pem = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    return (
        grpc.ssl_channel_credentials(root_certificates=pem),
        [("grpc.ssl_target_name_override", target_name(pem))],
    )


def peer_channel(
    address: str, certificate_pem: bytes | str, options: Iterable[tuple[str, object]] = ()
) -> grpc.Channel:
    """A channel to an ec262 server that must present exactly this
    certificate; any other fails the handshake before a byte of a request
    is sent."""
    credentials, names = peer_credentials(certificate_pem)
    return grpc.secure_channel(address, credentials, options=[*names, *options])


def channel(
    address: str, certificate_pem: bytes | str | None, options: Iterable[tuple[str, object]] = ()
) -> grpc.Channel:
    """TLS to exactly `certificate_pem` when there is one, else plaintext."""
    if certificate_pem:
        return peer_channel(address, certificate_pem, options)
    return grpc.insecure_channel(address, options=list(options))


def presented_certificate(address: str, timeout: float = PROBE_TIMEOUT) -> bytes | None:
    """The DER certificate a TLS server at `address` presents, without
    trusting it (to pin it, or to name it when it does not match); None
    when the server answers but does not speak TLS. OSError when nothing
    answers."""
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host.strip("[]"), port), timeout=timeout) as sock:
        try:
            with context.wrap_socket(sock) as tls:
                return tls.getpeercert(binary_form=True)
        except (ssl.SSLError, ConnectionResetError):
            return None


def pem_of_der(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def verifies(der: bytes, trusted_pem: bytes | str, hostname: str) -> bool:
    """Whether `der` is trusted by `trusted_pem`: the same certificate, or
    (a CA) one it issued for `hostname`."""
    pem = trusted_pem.encode() if isinstance(trusted_pem, str) else trusted_pem
    if fingerprint_of_der(der) == fingerprint(pem):
        return True
    if not is_ca(pem):
        return False
    presented = x509.load_der_x509_certificate(der)
    try:
        presented.verify_directly_issued_by(x509.load_pem_x509_certificate(pem))
    except Exception:  # a wrong signature, another key type: not issued by it
        return False
    with contextlib.suppress(x509.ExtensionNotFound):
        names = presented.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        listed = [*names.get_values_for_type(x509.DNSName)] + [
            str(a) for a in names.get_values_for_type(x509.IPAddress)
        ]
        return hostname in listed
    return False
