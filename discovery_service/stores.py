"""Opening a ledger store from the `--store` URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from discovery_service.store import LedgerStore

DATA_DIRECTORY = Path.home() / ".local/share/ec262"
DEFAULT_STORE = "sqlite:///" + str(DATA_DIRECTORY / "ledger.sqlite3")


def store_directory(url: str) -> Path:
    """Where a discovery service keeps its files beside the store (its TLS
    certificate): the SQLite file's folder, else DATA_DIRECTORY."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite" and not parts.netloc and parts.path not in ("/:memory:", ""):
        return Path(parts.path[1:]).parent.absolute()
    return DATA_DIRECTORY


def open_store(url: str) -> LedgerStore:
    """A store for `sqlite:///PATH`, `sqlite://:memory:` or
    `redis://HOST:PORT/DB` (`?prefix=...` to share one database).

    `sqlite:///ledger.db` is relative to the working directory and
    `sqlite:////var/lib/ec262/ledger.db` absolute, as in SQLAlchemy.
    `?synchronous=FULL` makes every commit survive a power cut, at the cost
    of an fsync per credit change.
    """
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "sqlite":
        from discovery_service.sqlite_store import SqliteStore

        if parts.netloc == ":memory:" or parts.path in ("/:memory:", ""):
            path = ":memory:"
        elif parts.netloc:
            raise ValueError(
                f"store URL {url!r}: write sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH"
            )
        else:
            path = parts.path[1:]
        return SqliteStore(path, synchronous=options.get("synchronous", "NORMAL"))
    if parts.scheme == "redis":
        from discovery_service.redis_store import RedisStore

        db = parts.path.strip("/") or "0"
        if not db.isdigit():
            raise ValueError(f"store URL {url!r}: the Redis database must be a number")
        return RedisStore(
            parts.hostname or "127.0.0.1",
            parts.port or 6379,
            int(db),
            prefix=options.get("prefix", "ec262:"),
        )
    raise ValueError(
        f"unknown store URL {url!r}: expected sqlite:///PATH, sqlite://:memory:"
        " or redis://HOST:PORT/DB"
    )
