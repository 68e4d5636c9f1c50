"""What the collector pushes and exposes: Prometheus metrics and alerts."""
