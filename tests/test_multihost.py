"""A job across machines (network namespaces joined by a bridge,
tests/netns.py, every host on a /24 of its own), with every default a user
would have: nothing configured but the discovery address. Docs/protocol.md
section 8: the servers off
loopback serve TLS by themselves, the clients pin the discovery service's
certificate on first use, workers on 0.0.0.0 advertise the address that
routes to the discovery service, the foreman's result server the same, and
a packet capture on the bridge finds nothing readable. Then the discovery
service's certificate changes and the foreman refuses it, naming both
fingerprints, with nothing spent."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from ec262.identity import load_identities, load_pins
from ec262.processes import PendingServer, ServerProcess, announced_fingerprint
from tests.capture import can_capture, eavesdrop, tcpdump
from tests.netns import Network, unavailable
from tests.netns_foreman import INPUT_MARKER
from tests.processes import ROOT

pytestmark = pytest.mark.slow

DISCOVERY_PORT = 26262


def _start(host, args: list[str]) -> ServerProcess:
    return PendingServer(args, launcher=host.launcher(), cwd=str(ROOT)).listening()


def _foreman(host, mode: str, discovery: str, identity) -> dict:
    done = host.run(
        [sys.executable, "-m", "tests.netns_foreman", mode,
         "--discovery", discovery, "--identity", str(identity)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    return json.loads(lines[-1])


@pytest.fixture
def network():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Network() as net:
        yield net


def test_a_job_across_hosts_with_defaults_is_tls_everywhere(network, tmp_path):
    capture_reason = can_capture()
    discovery_host = network.add_host("discovery", 1)
    workers = [network.add_host(f"worker{n}", 11 + n) for n in range(3)]
    foreman_host = network.add_host("foreman", 20)
    address = f"{discovery_host.address}:{DISCOVERY_PORT}"
    store = tmp_path / "discovery"
    discovery_args = [
        "discovery", "--host", discovery_host.address, "--port", str(DISCOVERY_PORT),
        "--store", f"sqlite:///{store / 'ledger.sqlite3'}", "--starting-credits", "100",
    ]  # fmt: skip
    started: list[ServerProcess] = []
    try:
        discovery = _start(discovery_host, discovery_args)
        started.append(discovery)
        fingerprint = announced_fingerprint(discovery)
        assert fingerprint, discovery.output  # off loopback: TLS without --tls
        for number, host in enumerate(workers):
            worker = _start(
                host,
                ["worker", "--host", "0.0.0.0", "-P", "0", "--discovery", address,
                 "--identity", str(tmp_path / f"worker{number}" / "id.json"), "--slots", "2",
                 "-v"],
            )  # fmt: skip
            started.append(worker)
            line = worker.wait_for("registered with discovery")
            assert f" at {host.address}:" in line, line  # the routable address, no name
            assert announced_fingerprint(worker)
        foreman_identity = tmp_path / "foreman" / "id.json"
        capture = tmp_path / "bridge.pcap"
        if capture_reason is None:
            with tcpdump("br0", "tcp", capture, launcher=network.hub_launcher()):
                outcome = _foreman(foreman_host, "job", address, foreman_identity)
        else:
            outcome = _foreman(foreman_host, "job", address, foreman_identity)
        assert outcome.get("right") is True, outcome
        assert outcome["foreman_address"].startswith(f"{foreman_host.address}:"), outcome
        assert outcome["after"] < outcome["before"]
        # Every client pinned the discovery service's real certificate.
        for path in [foreman_identity, *(tmp_path.glob("worker*/id.json"))]:
            assert load_pins(path)[address].sha256 == fingerprint, path

        if capture_reason is None:
            seen = eavesdrop(capture)
            assert seen.streams >= 8 and seen.tls_streams == seen.streams
            assert not seen.finds(INPUT_MARKER) and not seen.finds(b"Bearer")
            secrets = [
                i.secret
                for path in [foreman_identity, *tmp_path.glob("worker*/id.json")]
                for i in load_identities(path)
            ]
            assert len(secrets) == 4 and not [s for s in secrets if seen.finds(s)]

        # Addresses no foreman could use are refused, saying why: one where
        # nobody answers, and loopback registered from another host.
        for advertise, why in (("198.18.99.1", "unreachable"), ("127.0.0.1", "is loopback")):
            stray = _start(
                workers[0],
                ["worker", "--host", "0.0.0.0", "-P", "0", "--discovery", address,
                 "--advertise", advertise, "-v",
                 "--identity", str(tmp_path / f"stray-{advertise}" / "id.json")],
            )  # fmt: skip
            started.append(stray)
            line = stray.wait_for("registration refused")
            assert f"{advertise}:" in line and why in line, line
            stray.kill()

        # The discovery service comes back with another certificate (someone
        # else answering at its address): refused at once, nothing spent.
        discovery.stop()
        started.remove(discovery)
        kept = tmp_path / "kept"
        kept.mkdir()
        for name in ("tls-cert.pem", "tls-key.pem"):
            shutil.move(store / name, kept / name)
        impostor = _start(discovery_host, discovery_args)
        started.append(impostor)
        other = announced_fingerprint(impostor)
        assert other and other != fingerprint
        refused = _foreman(foreman_host, "job", address, foreman_identity)
        assert refused["error"] == "CertificateMismatch", refused
        assert fingerprint in refused["message"] and other in refused["message"]
        impostor.stop()
        started.remove(impostor)
        for name in ("tls-cert.pem", "tls-key.pem"):
            shutil.copy(kept / name, store / name)
        restored = _start(discovery_host, discovery_args)
        started.append(restored)
        assert announced_fingerprint(restored) == fingerprint
        balance = _foreman(foreman_host, "credits", address, foreman_identity)
        assert balance["credits"] == outcome["after"]
    finally:
        for server in started:
            server.kill()
