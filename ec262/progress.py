"""What a running job shows a person: a progress bar on stderr when stderr
is a terminal (tasks validated per phase, retries, cheaters seen, credits),
and the summary paragraph at the end."""

from __future__ import annotations

import logging
import sys

from foreman_service.stats import JobStats

logger = logging.getLogger("ec262.job")


class TerminalProgress:
    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def phase(self, name: str, total: int) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=f"{name:6}",
                unit="task",
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )

    def advance(self, stats: JobStats) -> None:
        if self._bar is None:
            return
        done = stats.tasks_validated - (stats.map_tasks if stats.phase == "reduce" else 0)
        self._bar.n = max(0, done)
        self._bar.set_postfix(
            retries=stats.retries,
            cheaters=stats.cheaters_seen,
            credits=stats.credits_spent,
            refresh=False,
        )
        self._bar.refresh()

    def close(self, stats: JobStats) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if stats.phase == "done":
            logger.info("%s", stats.summary())
            if self.enabled:
                print(stats.summary(), file=sys.stderr)
