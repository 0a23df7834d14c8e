"""A packet capture of a test's traffic (tcpdump), and what an eavesdropper
could read from it: the TCP streams reassembled and, where a stream is
plaintext HTTP/2, its headers (HPACK-decoded with python-hyper's `hpack`;
gRPC compresses header values with Huffman codes, so a secret in an
`authorization` header is not visible as raw bytes) and its DATA frames.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hpack

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_LINKTYPE_ETHERNET = 1
_LINKTYPE_LINUX_SLL = 113
_LINKTYPE_LINUX_SLL2 = 276


def can_capture() -> str | None:
    """None when tcpdump can capture here, else why not (for a skip)."""
    if shutil.which("tcpdump") is None:
        return "tcpdump is not installed (make test installs it as root)"
    if os.geteuid() != 0:
        return "capturing packets needs root (CAP_NET_RAW); run as root to include this test"
    return None


@contextlib.contextmanager
def tcpdump(
    interface: str, expression: str, path: Path, *, launcher: Sequence[str] = ()
) -> Iterator[Path]:
    """Capture `expression` on `interface` into `path` while the block
    runs (`launcher` before the command, e.g. to run it in a network
    namespace); returns once tcpdump says it is listening, and stops it
    (flushed) at the end."""
    # A 32 MiB kernel buffer (-B, KiB): a packet dropped in a burst would
    # leave a gap in a stream and the HPACK decoder out of step.
    command = ["tcpdump", "--immediate-mode", "-i", interface, "-U", "-n", "-s", "0", "-B", "32768"]
    process = subprocess.Popen(
        [*launcher, *command, "-w", str(path), expression],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    listening = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        for line in process.stderr:
            lines.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()

    threading.Thread(target=pump, daemon=True).start()
    listening.wait(30)
    if process.poll() is not None:
        raise RuntimeError(f"tcpdump did not start: {''.join(lines)}")
    try:
        yield path
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


# -- reading the capture ------------------------------------------------------------


@dataclass
class Stream:
    """One direction of one TCP connection."""

    source: tuple[str, int]
    destination: tuple[str, int]
    segments: dict[int, bytes] = field(default_factory=dict)  # sequence number -> payload

    @property
    def data(self) -> bytes:
        """The payload in order, retransmissions once. Sequence numbers
        start at random and wrap at 2**32: they are ordered from the first
        segment seen (the connection's first), not by their value."""
        if not self.segments:
            return b""
        base = next(iter(self.segments))
        out, next_at = bytearray(), None
        for at, seq in sorted(((seq - base) % 2**32, seq) for seq in self.segments):
            payload = self.segments[seq]
            if next_at is not None and at < next_at:
                payload = payload[next_at - at :]
            out += payload
            next_at = max(next_at or 0, at + len(self.segments[seq]))
        return bytes(out)


def _ip(raw: bytes) -> str:
    return ".".join(str(b) for b in raw) if len(raw) == 4 else raw.hex(":", 2)


def tcp_streams(path: Path) -> list[Stream]:
    """Every TCP stream direction in a pcap file (IPv4 and IPv6)."""
    blob = path.read_bytes()
    magic = blob[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", blob[20:24])[0]
    streams: dict[tuple, Stream] = {}
    offset = 24
    while offset + 16 <= len(blob):
        _sec, _frac, captured, _length = struct.unpack(endian + "IIII", blob[offset : offset + 16])
        frame = blob[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        if linktype == _LINKTYPE_ETHERNET:
            ethertype, packet = struct.unpack("!H", frame[12:14])[0], frame[14:]
        elif linktype == _LINKTYPE_LINUX_SLL:
            ethertype, packet = struct.unpack("!H", frame[14:16])[0], frame[16:]
        elif linktype == _LINKTYPE_LINUX_SLL2:
            ethertype, packet = struct.unpack("!H", frame[0:2])[0], frame[20:]
        else:
            raise ValueError(f"unexpected link type {linktype}")
        if ethertype == 0x0800 and packet and packet[9] == 6:
            header = (packet[0] & 0x0F) * 4
            total = struct.unpack("!H", packet[2:4])[0]
            source, destination = _ip(packet[12:16]), _ip(packet[16:20])
            segment = packet[header:total]
        elif ethertype == 0x86DD and len(packet) > 40 and packet[6] == 6:
            length = struct.unpack("!H", packet[4:6])[0]
            source, destination = _ip(packet[8:24]), _ip(packet[24:40])
            segment = packet[40 : 40 + length]
        else:
            continue
        sport, dport, seq = struct.unpack("!HHI", segment[:8])
        payload = segment[(segment[12] >> 4) * 4 :]
        if not payload:
            continue
        key = (source, sport, destination, dport)
        stream = streams.setdefault(key, Stream((source, sport), (destination, dport)))
        stream.segments.setdefault(seq, payload)
    return list(streams.values())


# -- what a plaintext HTTP/2 stream says ----------------------------------------------


@dataclass
class Http2View:
    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""


def http2_view(data: bytes) -> Http2View | None:
    """Headers and DATA payloads of a plaintext HTTP/2 stream direction (a
    client's starts with the preface; a server's with a SETTINGS frame);
    None when it is not plaintext HTTP/2 (TLS, say)."""
    if data.startswith(H2_PREFACE):
        data = data[len(H2_PREFACE) :]
    elif not (len(data) >= 9 and data[3] == 0x4 and data[4] in (0, 1)):  # SETTINGS
        return None
    view, decoder, block = Http2View(), hpack.Decoder(), b""
    decoder.max_allowed_table_size = 1 << 20
    payloads = bytearray()
    offset = 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        kind, flags = data[offset + 3], data[offset + 4]
        body = data[offset + 9 : offset + 9 + length]
        offset += 9 + length
        if kind == 0x0:  # DATA
            if flags & 0x8:  # PADDED
                body = body[1 : len(body) - body[0]]
            payloads += body
        elif kind in (0x1, 0x9):  # HEADERS, CONTINUATION
            if kind == 0x1:
                if flags & 0x8:
                    body = body[1 : len(body) - body[0]]
                if flags & 0x20:  # PRIORITY
                    body = body[5:]
            block += body
            if flags & 0x4:  # END_HEADERS
                view.headers += [(str(k), str(v)) for k, v in decoder.decode(block, raw=False)]
                block = b""
    view.data = bytes(payloads)
    return view


def is_tls(data: bytes) -> bool:
    """Whether a stream direction is TLS records: a handshake (22) for a
    connection seen from its start, application data (23) for one opened
    before the capture; record version 3.1 (a ClientHello) or 3.3."""
    return len(data) >= 5 and data[0] in (22, 23) and data[1:3] in (b"\x03\x01", b"\x03\x03")


@dataclass
class Eavesdropped:
    """Everything readable in a capture, and how much there was."""

    streams: int
    tls_streams: int
    plaintext_streams: int
    raw: bytes  # every stream's bytes, concatenated
    readable: bytes  # decoded header values and DATA payloads of plaintext streams
    header_names: set[str]
    tls_ports: set[int]  # both ends' ports of the TLS streams

    def finds(self, secret: str | bytes) -> bool:
        needle = secret.encode() if isinstance(secret, str) else secret
        return needle in self.raw or needle in self.readable


def eavesdrop(path: Path) -> Eavesdropped:
    streams = tcp_streams(path)
    raw, readable, names = bytearray(), bytearray(), set()
    tls = plaintext = 0
    tls_ports: set[int] = set()
    for stream in streams:
        data = stream.data
        raw += data + b"\0"
        view = http2_view(data)
        if view is not None:
            plaintext += 1
            names |= {name for name, _ in view.headers}
            readable += b"\0".join(v.encode() for _, v in view.headers) + b"\0" + view.data
        elif is_tls(data):
            tls += 1
            tls_ports |= {stream.source[1], stream.destination[1]}
    return Eavesdropped(len(streams), tls, plaintext, bytes(raw), bytes(readable), names, tls_ports)
