"""Each rank's own recent step-level figures: what is typical for it, which a step-level flag must rise above.

Under FSDP2 on 3 ranks sharing 2 cores each rank's optimizer step ran 10-45 ms for the same work, a spike on one
rank now, on another next, and their peers paid for some of them: against its peers' median alone such a spike
clears the bars. A straggler's figure rises over its own past too; one spike among spikes does not.
"""

from __future__ import annotations

import numpy as np

from modtrack.collector.small_arrays import nan_column_medians


class OwnHistory:
    """Each rank's step-level figures (data loading, optimizer, host time) over its last STEPS steps, to say what
    is typical for it: the median, before this step's figure joins them."""

    STEPS = 8

    def __init__(self) -> None:
        self.ranks = np.empty(0, np.int64)
        self.ring: np.ndarray = np.empty((0, 0, 0))
        self.pos = 0

    def typical(self, ranks: np.ndarray, figures: np.ndarray) -> np.ndarray:
        ranks = np.asarray(ranks, np.int64)
        if not np.array_equal(ranks, self.ranks) or self.ring.shape[2] != figures.shape[1]:
            self.ranks, self.ring, self.pos = ranks, np.full((self.STEPS, len(ranks), figures.shape[1]), np.nan), 0
        steps, r, c = self.ring.shape
        out = nan_column_medians(self.ring.reshape(steps, r * c)).reshape(r, c)
        self.ring[self.pos] = figures
        self.pos = (self.pos + 1) % self.STEPS
        return out
