"""modtrack collector: ingest rank reports, line ranks up, name the straggler. Never imports torch."""
