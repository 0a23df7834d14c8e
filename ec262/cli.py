"""`ec262 ...` and `python -m ec262 ...`: the command line (PROTOCOL.md section 6)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ec262 import __version__


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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0 = ephemeral), not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from discovery_service.stores import DEFAULT_STORE

    parser = argparse.ArgumentParser(
        prog="ec262", description="Volunteer-computing MapReduce over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"ec262 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    discovery = commands.add_parser(
        "discovery", help="run the discovery service (worker pool, task keys, credit ledger)"
    )
    discovery.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    discovery.add_argument("--port", type=_port, default=26262, help="0 picks a free port")
    discovery.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help="sqlite:///PATH (relative), sqlite:////PATH (absolute), or sqlite://:memory:;"
        " add ?synchronous=FULL to fsync every commit (default: %(default)s)",
    )
    discovery.add_argument("--starting-credits", type=_non_negative, default=12)
    discovery.add_argument(
        "--replication", type=_positive, default=3, help="workers per task (and credits per task)"
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
    _add_logging_flags(discovery)
    discovery.set_defaults(handler=_run_discovery)
    return parser


def _run_discovery(args: argparse.Namespace) -> int:
    from discovery_service.ledger import LedgerConfig
    from discovery_service.server import run

    try:
        config = LedgerConfig(
            starting_credits=args.starting_credits,
            replication=args.replication,
            worker_ttl=args.worker_ttl,
            task_ttl=args.task_ttl,
            max_worker_ttl=max(86_400, args.worker_ttl),
        )
    except ValueError as error:
        print(f"ec262 discovery: {error}", file=sys.stderr)
        return 2
    run(host=args.host, port=args.port, store_url=args.store, config=config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:  # bad store URL, port in use, unreadable file
        logging.getLogger("ec262").debug("startup failed", exc_info=True)
        print(f"ec262 {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
