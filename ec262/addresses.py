"""Parsing and checking of `host:port` addresses, shared by every service."""

from __future__ import annotations

import ipaddress
import re
import socket

from ec262.errors import InvalidRequest

MAX_ADDRESS_LENGTH = 270  # a 253-character DNS name, brackets, colon and port

# A DNS name or IPv4 address: letters, digits, dots, hyphens and underscores.
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9_.-]{1,32})?")


def split_address(address: str) -> tuple[str, int]:
    """Split `host:port` (or `[ipv6]:port`) and check both halves.

    Raises InvalidRequest with a message that says what is wrong, because
    an address is typed by a person or read from a flag.
    """
    if not isinstance(address, str) or not address:
        raise InvalidRequest("address is empty; expected HOST:PORT, e.g. 127.0.0.1:11235")
    if len(address) > MAX_ADDRESS_LENGTH:
        raise InvalidRequest(
            f"address is {len(address)} characters long; at most {MAX_ADDRESS_LENGTH} allowed"
        )
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
        if not sep or not _IPV6.fullmatch(host):
            raise InvalidRequest(f"address {address!r} is not [IPV6]:PORT")
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise InvalidRequest(f"address {address!r} is not HOST:PORT")
        if not _HOSTNAME.fullmatch(host):
            raise InvalidRequest(f"address {address!r} has an invalid host {host!r}")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise InvalidRequest(f"address {address!r} has an invalid port {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"address {address!r}: port {port} is outside 1-65535")
    return host, port


def join_address(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 literals so the result splits back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`. A wildcard (0.0.0.0, ::) is not:
    it listens on every interface."""
    host = host.strip("[]")
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in _WILDCARDS


def address_is_loopback(address: str) -> bool:
    return is_loopback(split_address(address)[0])


def outgoing_address(destination: str) -> str:
    """The local address this machine sends from to reach `destination` (a
    host): a UDP socket's connect, which sends nothing. OSError when there
    is no route."""
    host = destination.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, 9, family, socket.SOCK_DGRAM)
    with socket.socket(infos[0][0], socket.SOCK_DGRAM) as probe:
        probe.connect(infos[0][4])
        return str(probe.getsockname()[0])


def routable_host(toward: str) -> str:
    """The host others reach this machine at, for a server bound to a
    wildcard or started without an address: the local address that routes
    to `toward` (the discovery service's `HOST:PORT`, or several), so a
    foreman or worker on another machine can dial it back."""
    host = split_address(toward.split(",")[0].strip())[0]
    return outgoing_address(host)


IPV4_NETWORK_BITS = 24  # one operator's machines often share a /24 ...
IPV6_NETWORK_BITS = 48  # ... or an IPv6 /48 (docs/protocol.md section 10)


def network_of(host: str) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) an IP address lies in, as text
    (`198.51.100.0/24`); None for what is not an IP address."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    bits = IPV4_NETWORK_BITS if address.version == 4 else IPV6_NETWORK_BITS
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))
