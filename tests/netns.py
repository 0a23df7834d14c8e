"""A small network of hosts made of Linux network namespaces for a test: a
bridge in a hub namespace and one namespace per host, joined by veth
pairs, on one link with addresses of the benchmarking range 198.18.0.0/15
(RFC 2544, never routed), each host on a /24 of its own so that the
discovery service's network diversity (docs/protocol.md section 10) holds
with its defaults. Nothing of
it touches the machine's own namespace, and `close()` removes it all.
Loopback stays down in every host, so anything that would quietly use
127.0.0.1 fails instead."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

NETWORK = "198.18"  # 198.18.0.0/15: host N is 198.18.N.1
PREFIX_LENGTH = 15


def unavailable() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces (ip netns) needs root"
    probe = f"ec262-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns is unavailable here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    def launcher(self) -> list[str]:
        """What goes before a command to run it on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def run(self, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.launcher(), *args], **kwargs)


class Network:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"ec262-{self.tag}-hub"
        self.hosts: list[Host] = []
        self._namespaces = [self.hub]
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, name: str, number: int) -> Host:
        """Host `number` (1-254), at 198.18.NUMBER.1."""
        namespace = f"ec262-{self.tag}-{name}"
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        port = f"v{len(self.hosts)}"
        _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", namespace)  # fmt: skip
        _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
        address = f"{NETWORK}.{number}.1"
        _ip("-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        host = Host(namespace, address)
        self.hosts.append(host)
        return host

    def hub_launcher(self) -> list[str]:
        return ["ip", "netns", "exec", self.hub]

    def close(self) -> None:
        for namespace in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self._namespaces.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
