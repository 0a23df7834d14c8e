"""A client's identity file (docs/protocol.md sections 6 and 11): where it
lives, and one identity per ledger in it, made on first use so credits
survive restarts.

The file is `{"identities": {ledger_id: {"client_id", "secret",
"discovery"}}, "pins": {address: {"sha256", "certificate"}}}`, where
`discovery` lists the addresses (comma-separated) the identity has been
used at and `pins` the discovery certificates trusted on first use
(section 8). The single form of earlier versions,
`{"client_id", "secret", "discovery"}`, is still read (its ledger unknown
until it is next used). An identity is added for a new ledger, never
replacing another, so pointing a client at another cluster never breaks the
identity it has for the first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ec262.defaults import ENV_IDENTITY

logger = logging.getLogger(__name__)

DEFAULT_IDENTITY = Path("~/.config/ec262/identity.json")
UNKNOWN_LEDGER = ""  # the single form's identity, until its ledger is known


@dataclass(frozen=True)
class Identity:
    client_id: str
    secret: str
    discovery: str  # the addresses it has been used at, comma-separated
    ledger_id: str = UNKNOWN_LEDGER

    def metadata(self) -> tuple[tuple[str, str], ...]:
        from ec262.auth import bearer_metadata

        return bearer_metadata(self.client_id, self.secret)

    def addresses(self) -> list[str]:
        return [a for a in self.discovery.split(",") if a]

    def used_at(self, address: str) -> Identity:
        """The same identity, with `address` among its addresses."""
        known = self.addresses()
        new = [a for a in address.split(",") if a and a not in known]
        return replace(self, discovery=",".join(known + new)) if new else self


def identity_path(explicit: str | os.PathLike | None = None) -> Path:
    """`--identity`, else $EC262_IDENTITY, else ~/.config/ec262/identity.json."""
    chosen = explicit or os.environ.get(ENV_IDENTITY) or DEFAULT_IDENTITY
    return Path(chosen).expanduser()


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"identity file {path} is unreadable: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"identity file {path} is not a JSON object")
    return data


def load_identities(path: Path) -> list[Identity]:
    """Every identity in the file, oldest first; [] when there is no file."""
    data = _read(path)
    if data is None or set(data) <= {"pins"}:
        return []
    try:
        if isinstance(data, dict) and "identities" in data:
            return [
                Identity(
                    str(e["client_id"]),
                    str(e["secret"]),
                    str(e.get("discovery", "")),
                    UNKNOWN_LEDGER if ledger.startswith("unknown:") else ledger,
                )
                for ledger, e in data["identities"].items()
            ]
        discovery = str(data.get("discovery", ""))
        return [Identity(str(data["client_id"]), str(data["secret"]), discovery)]
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"identity file {path} lacks a client_id or secret") from None


def load_identity(path: Path, discovery: str | None = None) -> Identity | None:
    """The identity to use at `discovery`: the one used there before, else
    (when the file holds one, or no address is given) the newest."""
    identities = load_identities(path)
    if discovery:
        wanted = set(discovery.split(","))
        for identity in identities:
            if wanted & set(identity.addresses()):
                return identity
    return identities[-1] if identities else None


@dataclass(frozen=True)
class Pin:
    """A discovery certificate trusted on first use at one address."""

    sha256: str
    certificate: str  # PEM


def load_pins(path: Path) -> dict[str, Pin]:
    data = _read(path) or {}
    try:
        return {
            address: Pin(str(pin["sha256"]), str(pin["certificate"]))
            for address, pin in (data.get("pins") or {}).items()
        }
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"identity file {path} has a malformed pin") from None


def save_pin(path: Path, address: str, pin: Pin) -> None:
    """Pin `pin` for `address`, keeping the identities and other pins."""
    data = _read(path) or {}
    pins = dict(data.get("pins") or {})
    pins[address] = {"sha256": pin.sha256, "certificate": pin.certificate}
    _write(path, {**data, "pins": pins})


def save_identity(path: Path, identity: Identity) -> None:
    """Add or update `identity` (by its ledger) in the file, keeping every
    other ledger's and the pins; written atomically with mode 0600: a
    secret is worth credits."""
    kept = [
        i
        for i in load_identities(path)
        if i.ledger_id != identity.ledger_id and i.client_id != identity.client_id
    ]
    entries = {
        i.ledger_id or f"unknown:{i.client_id}": {
            "client_id": i.client_id,
            "secret": i.secret,
            "discovery": i.discovery,
        }
        for i in [*kept, identity]
    }
    pins = (_read(path) or {}).get("pins")
    _write(path, {"identities": entries, **({"pins": pins} if pins else {})})


def _write(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".identity-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
