"""The shapes of ec262's identifiers, checked in one place."""

from __future__ import annotations

import re

_TASK_ID = re.compile(r"[0-9a-f]{32}")
_CLIENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_task_id(text: object) -> bool:
    """A task id: 128 random bits as 32 lowercase hex digits."""
    return isinstance(text, str) and _TASK_ID.fullmatch(text) is not None


def is_client_id(text: object) -> bool:
    """A client id: a UUID in its canonical lowercase form."""
    return isinstance(text, str) and _CLIENT_ID.fullmatch(text) is not None
