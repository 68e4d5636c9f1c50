"""What the tests share: collectors (in process and as `python -m modtrack.collector serve`), fake ranks and a
fake collector over real gRPC, torchrun in its own process group, free ports, and one wait that fails at its
deadline. Tests import these as `from harness.x import ...`; tests/conftest.py holds the shared fixtures."""
