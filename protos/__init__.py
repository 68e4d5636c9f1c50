"""The wire contract between agent and collector (generated from modtrack.proto)."""
