"""ec262.processes: what a started server's output costs its starter."""

import io
import sys
from pathlib import Path

from ec262 import serving
from ec262.processes import KEPT_HEAD_LINES, KEPT_TAIL_LINES, running_server

ROOT = Path(__file__).resolve().parent.parent


def test_a_chatty_server_keeps_its_first_and_last_lines_only():
    written = KEPT_HEAD_LINES + 3 * KEPT_TAIL_LINES + 17
    with running_server(
        ["--lines", str(written)], module="tests.chatty_server", cwd=str(ROOT)
    ) as server:
        server.wait_for("all written")
        lines = list(server.lines)
    # Lines go in blocks: between KEPT_TAIL_LINES and twice that are kept.
    assert len(lines) >= KEPT_HEAD_LINES + 1 + KEPT_TAIL_LINES
    assert len(lines) <= KEPT_HEAD_LINES + 1 + 2 * KEPT_TAIL_LINES
    assert lines[0] == "listening on 127.0.0.1:9\n"
    assert lines[1:KEPT_HEAD_LINES] == [f"line {n}\n" for n in range(KEPT_HEAD_LINES - 1)]
    tail = lines[KEPT_HEAD_LINES + 1 :]
    kept_from = written - len(tail) + 1
    assert tail == [*(f"line {n}\n" for n in range(kept_from, written)), "all written\n"]
    assert lines[KEPT_HEAD_LINES] == (
        f"[... {kept_from - (KEPT_HEAD_LINES - 1)} lines of output not kept ...]\n"
    )


def test_a_quiet_server_keeps_every_line():
    with running_server(["--lines", "5"], module="tests.chatty_server", cwd=str(ROOT)) as server:
        server.wait_for("all written")
        assert (
            server.output
            == "listening on 127.0.0.1:9\n"
            + "".join(f"line {n}\n" for n in range(5))
            + "all written\n"
        )


def test_the_listening_line_is_written_whole_so_no_log_line_lands_inside_it(monkeypatch):
    """A log record written by another thread between the line and its
    newline was read as the end of the address (a worker's registration
    logs as it starts): `127.0.0.1:34843` became `127.0.0.1:348432026-12-03`."""

    class Recording(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    stream = Recording()
    monkeypatch.setattr(sys, "stderr", stream)
    serving.announce("127.0.0.1", 34843)
    assert stream.writes == ["listening on 127.0.0.1:34843\n"]
