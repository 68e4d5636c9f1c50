"""grpc for the agent, imported without its fork handlers and without touching the environment.

The handlers print a line on every fork (each DataLoader worker) while the sender thread is in
gRPC, and the children never use the agent's channel, so they buy nothing here. gRPC reads
GRPC_ENABLE_FORK_SUPPORT once, when it is imported: the variable is set for that import only and
taken back at once, so neither the training process nor its children inherit it. A user's own
setting, or a grpc imported before the agent, is left alone. Every agent module that needs grpc
imports it from here.
"""

from __future__ import annotations

import os
import sys


def _import_grpc():
    if "grpc" in sys.modules or "GRPC_ENABLE_FORK_SUPPORT" in os.environ:
        import grpc

        return grpc
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    try:
        import grpc
    finally:
        del os.environ["GRPC_ENABLE_FORK_SUPPORT"]
    return grpc


grpc = _import_grpc()
