"""Parsing and checking of `host:port` addresses, shared by every service."""

from __future__ import annotations

import re

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
