"""Exponential backoff, shared by both sides: the agent's reconnects and the collector's webhook retries."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(first_s: float, most_s: float, jitter: float = 0.0) -> Iterator[float]:
    """first_s, then doubling up to most_s, for ever. Each delay is shortened by a random share of up to
    `jitter` (0.5: to between half and all of it), so that many clients cut off together do not retry
    together."""
    delay = first_s
    while True:
        yield delay * (1.0 - jitter * random.random())
        delay = min(most_s, delay * 2)
