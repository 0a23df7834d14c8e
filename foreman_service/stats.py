"""What a job did, for the caller, the progress bar and GetJob."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class JobStats:
    job_id: str = ""
    foreman_address: str = ""  # where workers send results while the job runs
    phase: str = "planning"
    map_tasks: int = 0
    reduce_tasks: int = 0
    tasks_validated: int = 0
    tasks_invalid: int = 0
    retries: int = 0
    cheaters: set[str] = field(default_factory=set)
    missing_reports: int = 0
    credits_spent: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    states: Counter = field(default_factory=Counter)
    retry_reasons: Counter = field(default_factory=Counter)
    # Replicas that never started (refused: full or unreachable), added
    # (replacements and speculative ones), speculative ones asked for, and
    # cancelled (late after the quorum, or the job stopped).
    replicas_released: int = 0
    replicas_added: int = 0
    speculative_replicas: int = 0
    replicas_cancelled: int = 0
    # Per task settled: {"agreed", "disagreed", "late", "silent"} -> worker ids.
    verdicts: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def _replicas(self, verdict: str) -> int:
        return sum(len(v[verdict]) for v in self.verdicts.values())

    @property
    def cheaters_seen(self) -> int:
        return len(self.cheaters)

    def summary(self) -> str:
        """The one paragraph printed at the end of a job."""
        return (
            f"ec262 job {self.job_id[:8]}: {self.map_tasks} map and {self.reduce_tasks} reduce"
            f" tasks validated by quorum in {self.seconds:.2f} s"
            f" (map {self.phase_seconds.get('map', 0):.2f} s,"
            f" reduce {self.phase_seconds.get('reduce', 0):.2f} s) over"
            f" {self.input_bytes / 1e6:.2f} MB of input; {self.retries} retried,"
            f" {self.tasks_invalid} settled invalid, {self.cheaters_seen} cheating worker(s)"
            f" caught, {self._replicas('late')} late and {self._replicas('silent')} silent"
            f" replica(s), {self.missing_reports} missing result(s) reported;"
            f" {self.credits_spent} credits spent."
        )
