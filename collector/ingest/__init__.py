"""Ingest: the gRPC servicer every rank streams to, and the bounds checked before anything is stored."""
