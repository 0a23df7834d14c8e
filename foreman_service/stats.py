"""What a job did, for the caller, the progress bar and GetJob."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ec262 import replication as replicas


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
    # cancelled (late after the quorum, or the job stopped), and withdrawn
    # (dropped unstarted at the quorum, which no longer needed them).
    replicas_released: int = 0
    replicas_added: int = 0
    speculative_replicas: int = 0
    replicas_cancelled: int = 0
    replicas_withdrawn: int = 0
    # Per task settled: {"agreed", "disagreed", "late", "silent"} -> worker ids.
    verdicts: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # Adaptive replication (docs/protocol.md section 10): credits its valid
    # tasks did not cost against full replication, and the tasks that got
    # the rest of their workers because the first ones disagreed.
    adaptive: bool = False
    credits_saved: int = 0
    adaptive_escalations: int = 0

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
            f" {self.credits_spent} credits spent." + self._adaptive_summary()
        )

    def _adaptive_summary(self) -> str:
        """Credits saved, and the error bound under the stated assumptions
        (ec262/replication.py `wrong_task_bound`)."""
        if not self.adaptive:
            return ""
        tasks = self.map_tasks + self.reduce_tasks
        bound = replicas.wrong_task_bound()
        return (
            f" Adaptive replication saved {self.credits_saved} credits"
            f" ({self.adaptive_escalations} task(s) got a third worker); if"
            f" {replicas.ASSUMED_COLLUDING_TRUSTED:.0%} of trusted workers collude"
            f" (spot checks {replicas.SPOT_CHECK_RATE:.0%}), a task is wrong with probability"
            f" at most {bound:.2%}, {bound * tasks:.2f} of this job's {tasks} expected."
        )
