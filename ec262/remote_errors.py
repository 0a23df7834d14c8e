"""User-code errors travelling as data (docs/protocol.md section 4).

A failed task's plaintext is `{"error": {"type", "message", "traceback"}}`
with only the user's own frames, so every replica that runs the same code
on the same rows produces the same bytes, and the foreman can re-raise it
as `ec262.RemoteError`.
"""

from __future__ import annotations

import traceback
from collections.abc import Collection

ERROR_KEY = "error"
MAX_MESSAGE_CHARS = 2000
MAX_FRAMES = 50


def error_document(type_name: str, message: str, frames: list[str] | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "... (truncated)"
    return {ERROR_KEY: {"type": type_name, "message": message, "traceback": frames or []}}


def user_frames(error: BaseException, user_files: Collection[str]) -> list[str]:
    """`File "f", line n, in name` for the frames of the user's own code,
    without source lines (the worker has no source, and reading files is
    not allowed in the sandbox anyway)."""
    summary = traceback.StackSummary.extract(
        traceback.walk_tb(error.__traceback__), lookup_lines=False, capture_locals=False
    )
    frames = [
        f'File "{frame.filename}", line {frame.lineno}, in {frame.name}'
        for frame in summary
        if frame.filename in user_files
    ]
    return frames[-MAX_FRAMES:]


def document_for(error: BaseException, user_files: Collection[str]) -> dict:
    return error_document(type(error).__name__, str(error), user_frames(error, user_files))


def is_error_document(result: object) -> bool:
    return (
        isinstance(result, dict)
        and len(result) == 1
        and isinstance(result.get(ERROR_KEY), dict)
        and {"type", "message", "traceback"} <= set(result[ERROR_KEY])
    )
