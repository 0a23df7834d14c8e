"""The bearer credential every call but CreateClient carries.

Metadata `authorization: Bearer <client_id>:<secret>` (docs/protocol.md section 2).
Both sides live here so the format is written once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from ec262.errors import AuthenticationError
from ec262.ids import is_client_id

AUTHORIZATION_KEY = "authorization"
_SCHEME = "bearer "
MAX_SECRET_LENGTH = 256


def new_secret() -> str:
    """A 256-bit random secret, URL-safe text."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> bytes:
    """SHA-256 of the secret.

    A slow password hash (scrypt, argon2) defends low-entropy human
    passwords; these secrets are 256 random bits that no one can guess, so a
    single fast hash is as safe and keeps auth off the hot path's profile.
    """
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def bearer_metadata(client_id: str, secret: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends."""
    return ((AUTHORIZATION_KEY, f"Bearer {client_id}:{secret}"),)


def parse_bearer(value: str | None) -> tuple[str, str]:
    """(client_id, secret) from an authorization header value.

    Raises AuthenticationError with a message that tells the caller what
    shape was expected, never echoing the secret back.
    """
    if not value:
        raise AuthenticationError(
            "missing credentials: send metadata 'authorization: Bearer CLIENT_ID:SECRET' "
            "(CreateClient gives both)"
        )
    if value[: len(_SCHEME)].lower() != _SCHEME:
        raise AuthenticationError("authorization must use the Bearer scheme")
    client_id, sep, secret = value[len(_SCHEME) :].strip().partition(":")
    if not sep or not secret:
        raise AuthenticationError("bearer token must be CLIENT_ID:SECRET")
    if len(secret) > MAX_SECRET_LENGTH:
        raise AuthenticationError("bearer secret is too long")
    if not is_client_id(client_id):
        raise AuthenticationError("bearer token's client id is not a canonical lowercase UUID")
    return client_id, secret
