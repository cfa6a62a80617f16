"""Jittered exponential backoff with injectable randomness (tests drive it exactly)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RECONNECT_BACKOFF_MAX", "Backoff"]


@dataclass(slots=True)
class Backoff:
    """Full-jitter exponential backoff: attempt n waits uniform(0, min(cap, initial * 2**n)),
    never less than ``initial / 2`` so retries do not spin."""

    initial: float = 0.5
    cap: float = 30.0
    rng: Callable[[], float] = field(default=random.random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self.attempt))
        self.attempt += 1
        jittered: float = ceiling * self.rng()
        return max(self.initial / 2, jittered)

    def reset(self) -> None:
        self.attempt = 0


#: Reconnect loops (the informer's watch, the lease session's re-grant) back off at most this
#: long between attempts, so they are back within about that long once etcd answers again
#: (an attempt against a dead etcd costs a refused connection).
RECONNECT_BACKOFF_MAX = 2.0
