"""The pipeline: merge the ranks' reports per step, detect stragglers, keep episodes."""
