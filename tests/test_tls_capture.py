"""What a passive eavesdropper on the wire learns from one whole job
(docs/protocol.md section 8): with TLS nothing (no input, no secret, no task
key, no submit token, no user code, no `authorization` header); the same
capture of a plaintext job finds every one of them, which shows the
eavesdropper would have seen them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ec262
from ec262.discovery_client import DiscoveryClient
from ec262.identity import load_identities
from ec262.local_cluster import LocalCluster
from foreman_service.inbox import ResultInbox
from tests.capture import Stream, can_capture, eavesdrop, tcpdump

pytestmark = pytest.mark.slow

# Every party of the job listens here and nothing else does, so the capture
# holds this job's traffic alone.
HOST = "127.0.86.1"
INPUT_MARKER = "quixoticzebracorn"
CODE_MARKER = "ec262-code-marker-5e1f"


def marked_mapper(key, text):
    tag = "ec262-code-marker-5e1f"  # in the pickled code, not in any output
    for word in text.split():
        yield word, len(tag) // len(tag)


def sum_reducer(word, counts):
    return sum(counts)


DATA = {f"doc{n}": f"alpha {INPUT_MARKER}{n} beta gamma alpha" for n in range(40)}


@dataclass
class Secrets:
    keys: list[bytes] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    bearer: list[str] = field(default_factory=list)  # client secrets
    server_ports: set[int] = field(default_factory=set)  # discovery, workers, foreman


def _run_captured(tmp_path: Path, monkeypatch, *, tls: bool) -> tuple[Secrets, object]:
    secrets = Secrets()
    settle, expect = DiscoveryClient.settle_tasks, ResultInbox.expect

    def recording_settle(self, requests):
        replies = settle(self, requests)
        secrets.keys += [r.key for r in replies if not isinstance(r, Exception) and r.key]
        return replies

    def recording_expect(self, task_id, worker_id, token):
        secrets.tokens.append(token)
        return expect(self, task_id, worker_id, token)

    monkeypatch.setattr(DiscoveryClient, "settle_tasks", recording_settle)
    monkeypatch.setattr(ResultInbox, "expect", recording_expect)
    directory = tmp_path / ("tls" if tls else "plain")
    capture = tmp_path / f"{directory.name}.pcap"
    with LocalCluster(workers=3, slots=2, directory=str(directory), tls=tls, host=HOST) as cluster:
        with tcpdump("lo", f"host {HOST}", capture):
            result = ec262.run_job(
                DATA,
                mapper=marked_mapper,
                reducer=sum_reducer,
                discovery=cluster.address,
                discovery_cert=cluster.discovery_cert,
                identity=cluster.foreman_identity,
                host=HOST,
                progress=False,
            )
        assert result["alpha"] == 80 and result[f"{INPUT_MARKER}7"] == 1
        secrets.server_ports = {
            int(server.address.rsplit(":", 1)[1])
            for server in [cluster.discovery, *cluster.workers]
        } | {int(result.stats.foreman_address.rsplit(":", 1)[1])}
        for path in directory.glob("*.json"):
            secrets.bearer += [i.secret for i in load_identities(path)]
    monkeypatch.undo()
    assert secrets.keys and secrets.tokens and len(secrets.bearer) == 4
    return secrets, eavesdrop(capture)


def test_a_tls_job_shows_an_eavesdropper_nothing(tmp_path, monkeypatch):
    reason = can_capture()
    if reason:
        pytest.skip(reason)

    # The detector first: in plaintext it finds everything.
    secrets, seen = _run_captured(tmp_path, monkeypatch, tls=False)
    assert seen.plaintext_streams > 0 and seen.tls_streams == 0
    assert "authorization" in seen.header_names
    assert seen.finds(INPUT_MARKER) and seen.finds(CODE_MARKER)
    assert all(seen.finds(s) for s in secrets.bearer)
    assert all(seen.finds(k) for k in secrets.keys)
    assert all(seen.finds(t) for t in secrets.tokens)

    secrets, seen = _run_captured(tmp_path, monkeypatch, tls=True)
    # Every connection of the job, and only TLS ones: discovery, workers,
    # the foreman's result server, the discovery service's probes.
    assert seen.streams >= 10 and seen.tls_streams == seen.streams, seen
    assert secrets.server_ports <= seen.tls_ports
    assert seen.plaintext_streams == 0 and not seen.header_names
    assert not seen.finds(b"authorization") and not seen.finds(b"Bearer")
    assert not seen.finds(INPUT_MARKER) and not seen.finds(CODE_MARKER)
    leaked = [s for s in secrets.bearer if seen.finds(s)]
    leaked += [k.hex() for k in secrets.keys if seen.finds(k)]
    leaked += [t for t in secrets.tokens if seen.finds(t)]
    assert leaked == []


def test_a_stream_is_reassembled_across_the_sequence_number_wrap():
    """TCP sequence numbers start at random and wrap at 2**32: ordered by
    value, a stream crossing the wrap came out shuffled (and its HPACK
    headers out of step). Retransmitted bytes count once."""
    stream = Stream(("127.0.0.1", 1), ("127.0.0.1", 2))
    first = 2**32 - 3
    for seq, payload in ((first, b"abc"), (0, b"def"), (3, b"ghi"), (1, b"efg")):
        stream.segments[seq] = payload
    assert stream.data == b"abcdefghi"
