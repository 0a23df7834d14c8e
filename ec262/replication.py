"""Adaptive replication's constants and arithmetic, shared by the discovery
service (which draws the workers) and the foreman (which escalates and
reports): docs/protocol.md section 10.

An adaptive task gets 2 trusted workers and a quorum of 2; a third is added
only when they disagree or one is late. A random SPOT_CHECK_RATE of tasks
runs at full replication (3 workers, an untrusted one among them when one is
live), so untrusted workers can earn trust and a lone turncoat is caught.
"""

from __future__ import annotations

# RequestTasksRequest.replication: 0 is the discovery service's default,
# 1-99 that many workers per task, ADAPTIVE the scheme above.
DEFAULT = 0
ADAPTIVE = -1
ADAPTIVE_NAME = "adaptive"
MAX_REPLICATION = 99

# Workers (and quorum) of an adaptive task: full replication is 3, quorum 2.
ADAPTIVE_FULL = 3
ADAPTIVE_START = 2
SPOT_CHECK_RATE = 0.10
# The summary's stated assumption: this share of trusted workers collude
# (turncoats that earned trust); any number of untrusted ones may.
ASSUMED_COLLUDING_TRUSTED = 0.10


def quorum(replication: int) -> int:
    """A strict majority of a task's full replication."""
    return replication // 2 + 1


def parse(value: int | str | None) -> int:
    """`replication=` of run_job or `--replication`: an int 1-99 or
    "adaptive" (None: the discovery service's default), as carried in
    RequestTasksRequest.replication."""
    if value is None:
        return DEFAULT
    if isinstance(value, str):
        text = value.strip().lower()
        if text == ADAPTIVE_NAME:
            return ADAPTIVE
        if not text.isdigit():
            raise ValueError(_bad(value))
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPLICATION:
        raise ValueError(_bad(value))
    return value


def _bad(value: object) -> str:
    return (
        f"replication is 1-{MAX_REPLICATION} workers per task or {ADAPTIVE_NAME!r}, not {value!r}"
    )


def wrong_task_bound(
    colluding_trusted: float = ASSUMED_COLLUDING_TRUSTED, spot_checks: float = SPOT_CHECK_RATE
) -> float:
    """The chance an adaptive task's accepted result is wrong, at most, when
    a fraction `colluding_trusted` of trusted workers collude and every
    untrusted worker may. A task of 2 trusted workers is wrong when both
    collude, or when one does and the trusted third that decides between
    them does too: 3f² - 2f³, as 2 of 3 trusted. A spot check (2 trusted,
    1 untrusted) is wrong when one of its trusted workers colludes:
    1 - (1 - f)²."""
    f, s = colluding_trusted, spot_checks
    return (1 - s) * (3 * f * f - 2 * f**3) + s * (1 - (1 - f) ** 2)
