"""Shared test set-up. Helpers the tests share live in tests/harness/."""
import os
import sys

# The tests run as in an activated virtual environment: console scripts (modtrack-agent,
# modtrack-collector) and torchrun --no-python find the installed commands on PATH.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
