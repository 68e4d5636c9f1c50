"""Phase names both sides use, from modtrack.proto's Phase enum. A module's figures are kept per phase
(MODULE_PHASES, in enum order: a name's index + 1 is its enum number); a heartbeat says where its rank is
(POSITION_PHASES: in a module phase, or outside every module: Heartbeat.phase)."""

from __future__ import annotations

from modtrack.protos import modtrack_pb2 as pb

MODULE_PHASES: tuple[str, ...] = tuple(
    pb.Phase.Name(number).removeprefix("PHASE_").lower() for number in range(1, max(pb.Phase.values()) + 1)
)
POSITION_PHASES: tuple[str, ...] = (*MODULE_PHASES, "optimizer", "data", "outside")
