"""A client's identity file (docs/protocol.md section 6): where it lives, and
making one on first use so credits survive restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_IDENTITY = "EC262_IDENTITY"
DEFAULT_IDENTITY = Path("~/.config/ec262/identity.json")


@dataclass(frozen=True)
class Identity:
    client_id: str
    secret: str
    discovery: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        from ec262.auth import bearer_metadata

        return bearer_metadata(self.client_id, self.secret)


def identity_path(explicit: str | os.PathLike | None = None) -> Path:
    """`--identity`, else $EC262_IDENTITY, else ~/.config/ec262/identity.json."""
    chosen = explicit or os.environ.get(ENV_IDENTITY) or DEFAULT_IDENTITY
    return Path(chosen).expanduser()


def load_identity(path: Path) -> Identity | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"identity file {path} is unreadable: {error}") from None
    try:
        return Identity(str(data["client_id"]), str(data["secret"]), str(data.get("discovery", "")))
    except (KeyError, TypeError):
        raise ValueError(f"identity file {path} lacks client_id or secret") from None


def save_identity(path: Path, identity: Identity) -> None:
    """Write atomically with mode 0600: the secret is worth credits."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".identity-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(
                {
                    "client_id": identity.client_id,
                    "secret": identity.secret,
                    "discovery": identity.discovery,
                },
                handle,
            )
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
