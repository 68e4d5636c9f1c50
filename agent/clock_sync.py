"""NTP-style offset between the agent's clock and the collector's.

The agent stamps t1 (send) and t4 (receive) on its own clock, the collector t2 and t3 on
its clock. offset = ((t2 - t1) + (t3 - t4)) / 2 is exact when the two legs take equal time;
the error is at most half the round trip, so the sample with the smallest round trip wins.
Samples expire after a while so that slow drift between the two clocks is followed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class ClockSample:
    offset_ns: int  # collector_ns = agent_ns + offset_ns
    rtt_ns: int


def sample_from_pong(t1: int, t2: int, t3: int, t4: int) -> ClockSample:
    rtt = (t4 - t1) - (t3 - t2)
    offset = ((t2 - t1) + (t3 - t4)) // 2
    return ClockSample(offset_ns=offset, rtt_ns=max(0, rtt))


class ClockSync:
    """Keeps the minimum-RTT sample of the last `window` pongs; says when to tell the collector."""

    def __init__(self, window: int = 16, drift_ns: int = 100_000):
        self._samples: collections.deque[ClockSample] = collections.deque(maxlen=window)
        self._drift_ns = drift_ns
        self._sent: ClockSample | None = None

    @property
    def best(self) -> ClockSample | None:
        return min(self._samples, key=lambda s: s.rtt_ns) if self._samples else None

    def add(self, t1: int, t2: int, t3: int, t4: int) -> ClockSample | None:
        """Record a pong; returns the sample to send when the estimate improved or drifted."""
        if t4 < t1 or t3 < t2:
            return None  # a pong that is not ours, or a broken clock: ignore it
        self._samples.append(sample_from_pong(t1, t2, t3, t4))
        best = self.best
        assert best is not None  # one was just added
        sent = self._sent
        if sent is None or best.rtt_ns < sent.rtt_ns or abs(best.offset_ns - sent.offset_ns) > self._drift_ns:
            self._sent = best
            return best
        return None

    def reset(self) -> None:
        """A new stream: the collector on the other end knows nothing yet."""
        self._samples.clear()
        self._sent = None
