"""`ec262 ...` and `python -m ec262 ...`: the command line (docs/protocol.md section 6)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from ec262 import __version__
from ec262 import replication as replicas
from ec262.defaults import DEFAULT_DISCOVERY, DEFAULT_HOST, DEFAULT_PORT, ENV_DISCOVERY
from ec262.errors import Ec262Error


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.INFO
    if getattr(args, "debug", False):
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("-V", "--debug", action="store_true", help="log at DEBUG level")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def _replication(text: str) -> int:
    try:
        return replicas.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0 = ephemeral), not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from discovery_service.ledger import DEFAULT_LATE_WINDOW
    from discovery_service.stores import DEFAULT_STORE

    parser = argparse.ArgumentParser(
        prog="ec262", description="Volunteer-computing MapReduce over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"ec262 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    discovery = commands.add_parser(
        "discovery", help="run the discovery service (worker pool, task keys, credit ledger)"
    )
    discovery.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on")
    discovery.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    discovery.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help="sqlite:///PATH (relative), sqlite:////PATH (absolute), or sqlite://:memory:;"
        " add ?synchronous=FULL to fsync every commit (default: %(default)s)",
    )
    discovery.add_argument("--starting-credits", type=_non_negative, default=12)
    discovery.add_argument(
        "--replication",
        type=_replication,
        default="3",
        metavar="N|adaptive",
        help="workers (and credits) per task for requests that name none; adaptive: 2"
        " trusted workers, a third on disagreement or lateness, 10%% spot checks at 3"
        " (default %(default)s)",
    )
    discovery.add_argument(
        "--worker-ttl",
        type=_positive,
        default=60,
        help="seconds a worker's registration lasts without a heartbeat",
    )
    discovery.add_argument(
        "--task-ttl",
        type=_positive,
        default=86_400,
        help="seconds before an unsettled task expires and is refunded",
    )
    discovery.add_argument(
        "--foreman-lease",
        type=_positive,
        default=60,
        help="seconds a foreman may be silent before its open tasks are refunded"
        " and their workers freed (a running foreman calls every third of it)",
    )
    discovery.add_argument(
        "--trusted-after",
        type=_non_negative,
        default=10,
        metavar="N",
        help="matching results in a row before a worker is trusted; while enough trusted"
        " workers are live, a task holds at most replication - quorum untrusted ones"
        " (0 turns this off; default %(default)s)",
    )
    discovery.add_argument(
        "--late-window",
        type=_non_negative_seconds,
        default=DEFAULT_LATE_WINDOW,
        metavar="SECONDS",
        help="how long after a task is settled its workers that have not committed yet"
        " may still do so: paid if their result matches, else counted failed"
        " (default %(default)g)",
    )
    discovery.add_argument(
        "--max-new-clients",
        type=_non_negative,
        default=None,
        metavar="N",
        help="new identities per hour from one /24 (or /48) of callers; 0 = no limit"
        " (default: 20 off loopback, no limit on a loopback --host)",
    )
    discovery.add_argument(
        "--diversity",
        choices=("network", "identity"),
        default=None,
        help="replicas of one task never share an identity or an address; `network`"
        " also keeps them on distinct /24s (/48s) (default: network off loopback,"
        " identity on a loopback --host)",
    )
    add_tls_arguments(discovery, "the directory of the --store file (or ~/.local/share/ec262)")
    _add_logging_flags(discovery)
    discovery.set_defaults(handler=_run_discovery)

    worker = commands.add_parser(
        "worker", help="volunteer this machine: compute other people's tasks for credits"
    )
    add_worker_arguments(worker)
    worker.set_defaults(handler=_run_worker)

    cluster = commands.add_parser(
        "cluster", help="a discovery service and workers on this machine, for repeated jobs"
    )
    cluster.add_argument("--workers", type=_positive, default=3)
    cluster.add_argument("--slots", type=_positive, default=2, help="slots per worker")
    cluster.add_argument(
        "--adversaries",
        default="",
        metavar="MODE:N,...",
        help="the adversary lab: also start misbehaving workers, e.g."
        " colluding:3,wrong:1,silent:1,slow:1 (modes: colluding, wrong, malformed, silent,"
        " slow); they share one /24, each honest worker has its own, and the discovery"
        " service keeps a task's replicas on distinct networks",
    )
    cluster.add_argument(
        "--dir",
        default=None,
        help="keep the ledger and identities here (default: a temporary folder)",
    )
    _add_logging_flags(cluster)
    cluster.set_defaults(handler=_run_cluster)

    status = commands.add_parser("status", help="your credits and counters")
    status.add_argument("--discovery", default=os.environ.get(ENV_DISCOVERY, DEFAULT_DISCOVERY))
    status.add_argument("--identity", default=None)
    add_discovery_cert_argument(status)
    _add_logging_flags(status)
    status.set_defaults(handler=_run_status)
    return parser


def add_tls_arguments(parser: argparse.ArgumentParser, where: str) -> None:
    """--tls, --tls-cert, --tls-key (docs/protocol.md section 8)."""
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve TLS on a loopback address too (always on for any other address)",
    )
    parser.add_argument(
        "--tls-cert",
        default=None,
        metavar="PATH",
        help=f"PEM certificate; made (self-signed) with --tls-key when absent (default:"
        f" tls-cert.pem in {where})",
    )
    parser.add_argument(
        "--tls-key", default=None, metavar="PATH", help="PEM private key (default: tls-key.pem)"
    )


def add_discovery_cert_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--discovery-cert",
        default=None,
        metavar="PATH",
        help="the discovery service's certificate or a CA for it (default:"
        " $EC262_DISCOVERY_CERT, else pinned in the identity file on first use)",
    )


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ec262 worker` (also used by `python worker.py`)."""
    parser.add_argument("-P", "--port", type=_port, default=11235, help="0 picks a free port")
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on")
    parser.add_argument(
        "--advertise",
        default=None,
        help="host name foremen should use to reach this worker (default: --host, or,"
        " when --host is 0.0.0.0 or ::, the local address that routes to the discovery"
        " service)",
    )
    parser.add_argument(
        "--discovery",
        default=os.environ.get(ENV_DISCOVERY, DEFAULT_DISCOVERY),
        help="HOST:PORT of the discovery service, or several front-ends of one ledger"
        " (HOST:PORT,HOST:PORT) (default: $EC262_DISCOVERY or %(default)s)",
    )
    parser.add_argument("--slots", type=_positive, default=1, help="tasks run at once")
    parser.add_argument(
        "--identity",
        default=None,
        help="identity file (default: $EC262_IDENTITY or ~/.config/ec262/identity.json)",
    )
    parser.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="NAME",
        help="let user code import NAME too (repeatable)",
    )
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wall-clock limit per task; the sandbox is killed after it",
    )
    parser.add_argument(
        "--memory-limit",
        type=_positive,
        default=1024,
        metavar="MB",
        help="address-space limit of each sandbox process",
    )
    add_tls_arguments(parser, "the directory of the identity file")
    add_discovery_cert_argument(parser)
    parser.add_argument(
        "--adversary",
        default="",
        metavar="MODE",
        help="misbehave on purpose, for the adversary lab: colluding, wrong, malformed,"
        " silent or slow (see `ec262 cluster --adversaries`)",
    )
    _add_logging_flags(parser)


def max_new_clients(host: str, flag: int | None) -> int:
    """--max-new-clients, else 20 off loopback and no limit on it."""
    from discovery_service.ledger import DEFAULT_MAX_NEW_CLIENTS
    from ec262.addresses import is_loopback

    if flag is not None:
        return flag
    return 0 if is_loopback(host) else DEFAULT_MAX_NEW_CLIENTS


def _run_discovery(args: argparse.Namespace) -> int:
    from discovery_service.ledger import LedgerConfig
    from discovery_service.server import run
    from ec262.addresses import is_loopback

    try:
        adaptive = args.replication == replicas.ADAPTIVE
        config = LedgerConfig(
            starting_credits=args.starting_credits,
            replication=replicas.ADAPTIVE_FULL if adaptive else args.replication,
            adaptive=adaptive,
            worker_ttl=args.worker_ttl,
            task_ttl=args.task_ttl,
            max_worker_ttl=max(86_400, args.worker_ttl),
            foreman_lease=args.foreman_lease,
            max_new_clients=max_new_clients(args.host, args.max_new_clients),
            diversity=args.diversity or ("identity" if is_loopback(args.host) else "network"),
            trusted_after=args.trusted_after,
            late_window=args.late_window,
        )
    except ValueError as error:
        print(f"ec262 discovery: {error}", file=sys.stderr)
        return 2
    run(
        host=args.host,
        port=args.port,
        store_url=args.store,
        config=config,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from ec262.addresses import split_address
    from worker_service.server import WorkerConfig, run

    for address in args.discovery.split(","):
        split_address(address.strip())
    config = WorkerConfig(
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        discovery=args.discovery,
        slots=args.slots,
        identity=Path(args.identity) if args.identity else None,
        allow_modules=tuple(args.allow_module),
        task_timeout=args.task_timeout,
        memory_limit_mb=args.memory_limit,
        adversary=args.adversary,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        discovery_cert=args.discovery_cert,
    )
    run(config)
    return 0


def _run_cluster(args: argparse.Namespace) -> int:
    from ec262 import serving
    from ec262.local_cluster import LocalCluster
    from worker_service.adversaries import parse_lab

    lab = parse_lab(args.adversaries)
    cluster = LocalCluster(
        workers=args.workers, slots=args.slots, directory=args.dir, adversaries=lab
    ).start()
    print(
        f"discovery on {cluster.address} with {args.workers} worker(s)"
        + (f" and {len(lab)} adversaries ({args.adversaries})" if lab else "")
        + "; run jobs with\n"
        f"  EC262_DISCOVERY={cluster.address} python your_job.py\n"
        f"  (foreman identity: --identity / EC262_IDENTITY={cluster.foreman_identity})",
        flush=True,
    )
    serving.announce(*cluster.address.rsplit(":", 1))
    serving.wait_for_signal(cluster.close)
    return 0


def _trust_text(info) -> str:
    """A worker's trust for `ec262 status` (docs/protocol.md section 10)."""
    if not info.address:
        return ""
    if not info.trusted_after:
        return f", trust {info.trust}"
    if info.trust >= info.trusted_after:
        return f", trust {info.trust} (trusted)"
    return f", trust {info.trust} (trusted at {info.trusted_after})"


def _run_status(args: argparse.Namespace) -> int:
    from ec262.discovery_client import DiscoveryClient
    from ec262.identity import identity_path, load_identity

    path = identity_path(args.identity)
    identity = load_identity(path, args.discovery)
    if identity is None:
        print(f"no identity at {path} yet: it is made on first use (a job or a worker)")
        return 1
    with DiscoveryClient(
        args.discovery, identity, certificate=args.discovery_cert, pins=path
    ) as client:
        info = client.get_client()
    print(
        f"client {info.client_id} at {args.discovery}: {info.credits} credits,"
        f" {info.tasks_completed} tasks completed, {info.tasks_failed} failed"
        + _trust_text(info)
        + (
            f"; worker at {info.address} ({info.busy_slots}/{info.slots} slots busy)"
            if info.address
            else ""
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ec262.processes import die_with_parent_if_asked

    die_with_parent_if_asked()
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return args.handler(args)
    except grpc.RpcError as error:
        print(f"ec262 {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except Ec262Error as error:
        print(f"ec262 {args.command}: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as error:  # bad input, port in use, ...
        logging.getLogger("ec262").debug("startup failed", exc_info=True)
        print(f"ec262 {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
