"""What every scenario gets: the run mode, a work dir for logs, and the profiling switch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class Ctx:
    quick: bool
    work: Path
    """Logs and scratch files of this run (kept on failure, removed on success)."""
    profile: str | None = None
    """The scenario whose own side runs under pyinstrument (``python -m bench profile P?``)."""
    profile_dir: Path | None = None

    def n(self, full: int, quick: int) -> int:
        """An iteration count: ``full`` normally, ``quick`` with ``--quick``."""
        return quick if self.quick else full

    def profile_session(self, scenario: str, role: str = "ours") -> Path | None:
        """Where a child of ``scenario`` in ``role`` writes its pyinstrument session, or
        ``None`` when this scenario is not being profiled."""
        if self.profile != scenario or self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        return self.profile_dir / f"{scenario}-{role}.pyisession"

    def scenario_dir(self, scenario: str) -> Path:
        path = self.work / scenario
        path.mkdir(parents=True, exist_ok=True)
        return path
