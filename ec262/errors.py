"""Exceptions that users and the services share.

The services raise these from plain-Python logic; each gRPC servicer maps
them to a status code in one place, and the client side maps status codes
back, so the same class means the same thing on both sides of the wire.
"""

from __future__ import annotations


class Ec262Error(Exception):
    """Base of every error ec262 raises on purpose."""


class InvalidRequest(Ec262Error, ValueError):
    """A request that can never succeed as sent (gRPC INVALID_ARGUMENT)."""


class AuthenticationError(Ec262Error):
    """Missing, malformed or wrong credentials (gRPC UNAUTHENTICATED)."""


class UnknownTask(Ec262Error, LookupError):
    """No such task for this caller: unknown, settled, expired or not yours
    (gRPC NOT_FOUND). One answer for all four, so a caller learns nothing
    about tasks that are not its own."""


class LateTask(UnknownTask):
    """A task settled without this worker's result, which it took: NOT_FOUND
    like any closed task, but its commitment is still judged until the late
    window ends (docs/protocol.md section 10), so the worker keeps it. Only
    that worker is told; anyone else gets plain UnknownTask."""


class InsufficientCredits(Ec262Error):
    """The caller's balance cannot pay for what it asked (gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, needed: int, available: int, message: str | None = None) -> None:
        self.needed = needed
        self.available = available
        super().__init__(message or f"not enough credits: {needed} needed, {available} available")

    def __reduce__(self):  # keep needed/available through pickling
        return (type(self), (self.needed, self.available, str(self)))


class ServiceUnavailable(Ec262Error):
    """The backing store cannot be reached; nothing was written (gRPC UNAVAILABLE)."""


class EncodingError(Ec262Error, ValueError):
    """A key or value that canonical JSON cannot carry (docs/protocol.md section 3)."""


class DecryptionError(Ec262Error):
    """A ciphertext that does not open with this key: wrong key, tampered or
    truncated envelope. Never garbage instead."""


class NoFreeSlot(Ec262Error):
    """A worker has no free slot for another task (gRPC RESOURCE_EXHAUSTED)."""


class FunctionNotCached(Ec262Error):
    """A worker was sent only a function digest it does not hold; resend the
    payload (gRPC FAILED_PRECONDITION)."""


class RemoteError(Ec262Error):
    """The user's function failed on the workers (every replica agreed on the
    error). Carries the remote exception's type, message and the user's own
    traceback frames."""

    def __init__(
        self,
        type_name: str,
        message: str,
        traceback: list[str] | None = None,
        *,
        chunk: str = "",
        output: str = "",
    ) -> None:
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = list(traceback or [])
        self.chunk = chunk
        self.remote_output = output  # the end of what the task printed
        frames = "".join(f"\n  {frame}" for frame in self.remote_traceback)
        where = f" in {chunk}" if chunk else ""
        printed = "".join(f"\n  | {line}" for line in output.splitlines())
        super().__init__(
            f"{type_name}: {message}{where} (raised on the workers)"
            + (f"\nRemote traceback (most recent call last):{frames}" if frames else "")
            + (f"\nThe task printed (the end of it):{printed}" if printed else "")
        )

    def __reduce__(self):
        return (
            _rebuild_remote_error,
            (self.type_name, self.remote_message, self.remote_traceback, self.chunk,
             self.remote_output),
        )  # fmt: skip


def _rebuild_remote_error(type_name, message, traceback, chunk, output=""):
    return RemoteError(type_name, message, traceback, chunk=chunk, output=output)


class JobFailed(Ec262Error):
    """No quorum for a chunk after the retry limit, or no workers to run it.
    `unreachable` names the workers this foreman could not reach (address:
    why), often the real cause (a wrong --advertise, a firewall)."""

    def __init__(
        self, message: str, *, chunk: str = "", unreachable: dict[str, str] | None = None
    ) -> None:
        self.chunk = chunk
        self.unreachable = dict(unreachable or {})
        if self.unreachable:
            shown = list(self.unreachable.items())[:5]
            message += (
                f"; {len(self.unreachable)} worker(s) unreachable from this foreman: "
                + ", ".join(f"{address} ({why})" for address, why in shown)
                + (", ..." if len(self.unreachable) > len(shown) else "")
            )
        super().__init__(message)


class NotEnoughWorkers(JobFailed):
    """Fewer live workers than a task needs (its replication): no task can be
    made until more join. Raised within seconds, before anything is spent
    on the tasks it could not make."""

    def __init__(
        self,
        live: int,
        needed: int,
        *,
        chunk: str = "",
        unreachable: dict[str, str] | None = None,
        spots: int | None = None,
        diversity: str = "",
    ) -> None:
        """`spots`: the distinct addresses (or networks) the live workers
        are on, when that is what falls short."""
        self.live = live
        self.needed = needed
        self.spots = spots
        if spots is None:
            message = (
                f"not enough workers: {live} live worker(s) other than this foreman, and a task"
                f" needs {needed} distinct ones (the discovery service's replication)"
            )
        elif diversity == "network":
            message = (
                f"not enough networks: {live} live worker(s) other than this foreman, on"
                f" {spots} distinct /24 (or /48) network(s), and the discovery service keeps"
                f" the {needed} replicas of a task on distinct networks (--diversity network;"
                " a cluster on one network runs it with --diversity identity)"
            )
        else:
            message = (
                f"not enough workers: {live} live worker(s) other than this foreman, at"
                f" {spots} distinct address(es), and the {needed} replicas of a task never"
                " share an address"
            )
        super().__init__(message, chunk=chunk, unreachable=unreachable)


class ResultNotDelivered(Ec262Error):
    """A worker gave up sending a result: the foreman refused it, stayed
    unreachable, or the task closed meanwhile (said in the worker's log)."""


class SettleConflict(Ec262Error):
    """A SettleTask that contradicts the settle that took effect (gRPC
    FAILED_PRECONDITION); the same settle again gets the same answer."""


class TaskConflict(Ec262Error):
    """A task id this worker has already taken, sent again with other
    contents (gRPC ALREADY_EXISTS): a task runs at most once per worker."""


class PermissionDenied(Ec262Error):
    """A caller that is known but not allowed this (gRPC PERMISSION_DENIED),
    e.g. a result sent with the wrong submit token."""


class CommitConflict(Ec262Error):
    """A second, different commitment to one task's result (gRPC
    FAILED_PRECONDITION): a worker commits once (docs/protocol.md section 10)."""


class NoCommittedQuorum(Ec262Error):
    """A valid SettleTask for a task whose workers have not committed a
    quorum of identical results (gRPC FAILED_PRECONDITION): no key, nothing
    paid. The foreman's agreeing results were not committed to: it settles
    the task invalid and runs it again (docs/protocol.md section 10)."""


class TooManyNewClients(Ec262Error):
    """CreateClient from a network that made its share of identities this
    hour (gRPC RESOURCE_EXHAUSTED): identities are free, so a flood of them
    is limited where it comes from (docs/protocol.md section 10)."""


class AddressRefused(Ec262Error):
    """A worker's address that foremen could not use (gRPC
    FAILED_PRECONDITION): it does not answer, does not present the
    certificate registered with it, or is loopback seen from another host
    (docs/protocol.md section 8)."""


class TrustError(Ec262Error):
    """A discovery service this client cannot trust as configured: never
    retried, and raised before any credit is spent (docs/protocol.md
    section 8)."""


class CertificateMismatch(TrustError):
    """The discovery service presented another certificate than the one
    given or pinned for its address: someone else may be answering there."""

    def __init__(self, address: str, expected: str, presented: str, source: str) -> None:
        self.address = address
        self.expected = expected
        self.presented = presented
        self.source = source
        super().__init__(
            f"discovery {address} presented certificate sha256:{presented}, but {source}"
            f" expects sha256:{expected}; refusing to send it anything. If the service's"
            " certificate was replaced on purpose, check the new fingerprint with its"
            " operator and then remove the pin (or pass the new certificate)"
        )

    def __reduce__(self):
        return (type(self), (self.address, self.expected, self.presented, self.source))
