from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClockKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLOCK_KIND_UNSPECIFIED: _ClassVar[ClockKind]
    CLOCK_KIND_CPU: _ClassVar[ClockKind]
    CLOCK_KIND_CUDA: _ClassVar[ClockKind]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_FORWARD: _ClassVar[Phase]
    PHASE_BACKWARD: _ClassVar[Phase]
    PHASE_RECOMPUTE: _ClassVar[Phase]

class GpuClockReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_CLOCK_REASON_NONE: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_GPU_IDLE: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_APPLICATIONS_CLOCKS: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_SW_POWER_CAP: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_HW_SLOWDOWN: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_SYNC_BOOST: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_SW_THERMAL: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_HW_THERMAL: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_HW_POWER_BRAKE: _ClassVar[GpuClockReason]
    GPU_CLOCK_REASON_DISPLAY_CLOCKS: _ClassVar[GpuClockReason]
CLOCK_KIND_UNSPECIFIED: ClockKind
CLOCK_KIND_CPU: ClockKind
CLOCK_KIND_CUDA: ClockKind
PHASE_UNSPECIFIED: Phase
PHASE_FORWARD: Phase
PHASE_BACKWARD: Phase
PHASE_RECOMPUTE: Phase
GPU_CLOCK_REASON_NONE: GpuClockReason
GPU_CLOCK_REASON_GPU_IDLE: GpuClockReason
GPU_CLOCK_REASON_APPLICATIONS_CLOCKS: GpuClockReason
GPU_CLOCK_REASON_SW_POWER_CAP: GpuClockReason
GPU_CLOCK_REASON_HW_SLOWDOWN: GpuClockReason
GPU_CLOCK_REASON_SYNC_BOOST: GpuClockReason
GPU_CLOCK_REASON_SW_THERMAL: GpuClockReason
GPU_CLOCK_REASON_HW_THERMAL: GpuClockReason
GPU_CLOCK_REASON_HW_POWER_BRAKE: GpuClockReason
GPU_CLOCK_REASON_DISPLAY_CLOCKS: GpuClockReason

class Hello(_message.Message):
    __slots__ = ("protocol_version", "job", "rank", "local_rank", "world_size", "group_rank", "host", "pid", "torch_version", "agent_version", "clock_kind", "module_names", "session", "attempt", "wall_durations")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_KIND_FIELD_NUMBER: _ClassVar[int]
    MODULE_NAMES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WALL_DURATIONS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    job: str
    rank: int
    local_rank: int
    world_size: int
    group_rank: int
    host: str
    pid: int
    torch_version: str
    agent_version: str
    clock_kind: ClockKind
    module_names: _containers.RepeatedScalarFieldContainer[str]
    session: str
    attempt: int
    wall_durations: bool
    def __init__(self, protocol_version: _Optional[int] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., world_size: _Optional[int] = ..., group_rank: _Optional[int] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., torch_version: _Optional[str] = ..., agent_version: _Optional[str] = ..., clock_kind: _Optional[_Union[ClockKind, str]] = ..., module_names: _Optional[_Iterable[str]] = ..., session: _Optional[str] = ..., attempt: _Optional[int] = ..., wall_durations: _Optional[bool] = ...) -> None: ...

class PhaseStats(_message.Message):
    __slots__ = ("phase", "module_id", "calls", "inclusive_ns", "self_ns", "first_start_ns", "last_end_ns", "call_start_ns", "call_end_ns")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    INCLUSIVE_NS_FIELD_NUMBER: _ClassVar[int]
    SELF_NS_FIELD_NUMBER: _ClassVar[int]
    FIRST_START_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_END_NS_FIELD_NUMBER: _ClassVar[int]
    CALL_START_NS_FIELD_NUMBER: _ClassVar[int]
    CALL_END_NS_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    module_id: _containers.RepeatedScalarFieldContainer[int]
    calls: _containers.RepeatedScalarFieldContainer[int]
    inclusive_ns: _containers.RepeatedScalarFieldContainer[int]
    self_ns: _containers.RepeatedScalarFieldContainer[int]
    first_start_ns: _containers.RepeatedScalarFieldContainer[int]
    last_end_ns: _containers.RepeatedScalarFieldContainer[int]
    call_start_ns: _containers.RepeatedScalarFieldContainer[int]
    call_end_ns: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., module_id: _Optional[_Iterable[int]] = ..., calls: _Optional[_Iterable[int]] = ..., inclusive_ns: _Optional[_Iterable[int]] = ..., self_ns: _Optional[_Iterable[int]] = ..., first_start_ns: _Optional[_Iterable[int]] = ..., last_end_ns: _Optional[_Iterable[int]] = ..., call_start_ns: _Optional[_Iterable[int]] = ..., call_end_ns: _Optional[_Iterable[int]] = ...) -> None: ...

class Trace(_message.Message):
    __slots__ = ("module_id", "phase", "start_ns", "end_ns", "depth", "capture_id")
    MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    END_NS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_ID_FIELD_NUMBER: _ClassVar[int]
    module_id: _containers.RepeatedScalarFieldContainer[int]
    phase: _containers.RepeatedScalarFieldContainer[Phase]
    start_ns: _containers.RepeatedScalarFieldContainer[int]
    end_ns: _containers.RepeatedScalarFieldContainer[int]
    depth: _containers.RepeatedScalarFieldContainer[int]
    capture_id: str
    def __init__(self, module_id: _Optional[_Iterable[int]] = ..., phase: _Optional[_Iterable[_Union[Phase, str]]] = ..., start_ns: _Optional[_Iterable[int]] = ..., end_ns: _Optional[_Iterable[int]] = ..., depth: _Optional[_Iterable[int]] = ..., capture_id: _Optional[str] = ...) -> None: ...

class AgentCounters(_message.Message):
    __slots__ = ("reports_dropped", "reconnects", "hook_errors", "send_errors", "heartbeat_errors")
    REPORTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    RECONNECTS_FIELD_NUMBER: _ClassVar[int]
    HOOK_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SEND_ERRORS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    reports_dropped: int
    reconnects: int
    hook_errors: int
    send_errors: int
    heartbeat_errors: int
    def __init__(self, reports_dropped: _Optional[int] = ..., reconnects: _Optional[int] = ..., hook_errors: _Optional[int] = ..., send_errors: _Optional[int] = ..., heartbeat_errors: _Optional[int] = ...) -> None: ...

class CollectiveStats(_message.Message):
    __slots__ = ("step", "group", "backend", "group_size", "ranks_hash", "count", "total_ns", "wait_ns", "bytes", "active_measured", "seq", "issue_ns", "active_ns", "unlisted")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_HASH_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    WAIT_NS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_MEASURED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ISSUE_NS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_NS_FIELD_NUMBER: _ClassVar[int]
    UNLISTED_FIELD_NUMBER: _ClassVar[int]
    step: int
    group: str
    backend: str
    group_size: int
    ranks_hash: int
    count: int
    total_ns: int
    wait_ns: int
    bytes: int
    active_measured: bool
    seq: _containers.RepeatedScalarFieldContainer[int]
    issue_ns: _containers.RepeatedScalarFieldContainer[int]
    active_ns: _containers.RepeatedScalarFieldContainer[int]
    unlisted: int
    def __init__(self, step: _Optional[int] = ..., group: _Optional[str] = ..., backend: _Optional[str] = ..., group_size: _Optional[int] = ..., ranks_hash: _Optional[int] = ..., count: _Optional[int] = ..., total_ns: _Optional[int] = ..., wait_ns: _Optional[int] = ..., bytes: _Optional[int] = ..., active_measured: _Optional[bool] = ..., seq: _Optional[_Iterable[int]] = ..., issue_ns: _Optional[_Iterable[int]] = ..., active_ns: _Optional[_Iterable[int]] = ..., unlisted: _Optional[int] = ...) -> None: ...

class GpuHealth(_message.Message):
    __slots__ = ("sampled_ns", "nvml_index", "name", "sm_clock_mhz", "max_sm_clock_mhz", "memory_clock_mhz", "temperature_c", "power_mw", "power_limit_mw", "utilization_pct", "clock_event_reasons", "ecc_uncorrected", "xid_events", "last_xid", "errors", "unavailable")
    SAMPLED_NS_FIELD_NUMBER: _ClassVar[int]
    NVML_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_MW_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_MW_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    CLOCK_EVENT_REASONS_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_XID_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    sampled_ns: int
    nvml_index: int
    name: str
    sm_clock_mhz: int
    max_sm_clock_mhz: int
    memory_clock_mhz: int
    temperature_c: int
    power_mw: int
    power_limit_mw: int
    utilization_pct: int
    clock_event_reasons: int
    ecc_uncorrected: int
    xid_events: int
    last_xid: int
    errors: int
    unavailable: str
    def __init__(self, sampled_ns: _Optional[int] = ..., nvml_index: _Optional[int] = ..., name: _Optional[str] = ..., sm_clock_mhz: _Optional[int] = ..., max_sm_clock_mhz: _Optional[int] = ..., memory_clock_mhz: _Optional[int] = ..., temperature_c: _Optional[int] = ..., power_mw: _Optional[int] = ..., power_limit_mw: _Optional[int] = ..., utilization_pct: _Optional[int] = ..., clock_event_reasons: _Optional[int] = ..., ecc_uncorrected: _Optional[int] = ..., xid_events: _Optional[int] = ..., last_xid: _Optional[int] = ..., errors: _Optional[int] = ..., unavailable: _Optional[str] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "start_ns", "end_ns", "forward_ns", "backward_ns", "optimizer_ns", "data_ns", "backward_tail_ns", "recompute_ns", "first_new_module_id", "new_module_names", "phases", "trace", "counters", "detail", "collectives", "gpu", "gc_ns", "gc_collections", "host_ns", "host_wait_ns")
    STEP_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    END_NS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_NS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_NS_FIELD_NUMBER: _ClassVar[int]
    DATA_NS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_TAIL_NS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    FIRST_NEW_MODULE_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_MODULE_NAMES_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GC_NS_FIELD_NUMBER: _ClassVar[int]
    GC_COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    HOST_NS_FIELD_NUMBER: _ClassVar[int]
    HOST_WAIT_NS_FIELD_NUMBER: _ClassVar[int]
    step: int
    start_ns: int
    end_ns: int
    forward_ns: int
    backward_ns: int
    optimizer_ns: int
    data_ns: int
    backward_tail_ns: int
    recompute_ns: int
    first_new_module_id: int
    new_module_names: _containers.RepeatedScalarFieldContainer[str]
    phases: _containers.RepeatedCompositeFieldContainer[PhaseStats]
    trace: Trace
    counters: AgentCounters
    detail: bool
    collectives: _containers.RepeatedCompositeFieldContainer[CollectiveStats]
    gpu: GpuHealth
    gc_ns: int
    gc_collections: int
    host_ns: int
    host_wait_ns: int
    def __init__(self, step: _Optional[int] = ..., start_ns: _Optional[int] = ..., end_ns: _Optional[int] = ..., forward_ns: _Optional[int] = ..., backward_ns: _Optional[int] = ..., optimizer_ns: _Optional[int] = ..., data_ns: _Optional[int] = ..., backward_tail_ns: _Optional[int] = ..., recompute_ns: _Optional[int] = ..., first_new_module_id: _Optional[int] = ..., new_module_names: _Optional[_Iterable[str]] = ..., phases: _Optional[_Iterable[_Union[PhaseStats, _Mapping]]] = ..., trace: _Optional[_Union[Trace, _Mapping]] = ..., counters: _Optional[_Union[AgentCounters, _Mapping]] = ..., detail: _Optional[bool] = ..., collectives: _Optional[_Iterable[_Union[CollectiveStats, _Mapping]]] = ..., gpu: _Optional[_Union[GpuHealth, _Mapping]] = ..., gc_ns: _Optional[int] = ..., gc_collections: _Optional[int] = ..., host_ns: _Optional[int] = ..., host_wait_ns: _Optional[int] = ...) -> None: ...

class StepReportBatch(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[StepReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ...) -> None: ...

class ClockPing(_message.Message):
    __slots__ = ("t1_ns",)
    T1_NS_FIELD_NUMBER: _ClassVar[int]
    t1_ns: int
    def __init__(self, t1_ns: _Optional[int] = ...) -> None: ...

class ClockPong(_message.Message):
    __slots__ = ("t1_ns", "t2_ns", "t3_ns")
    T1_NS_FIELD_NUMBER: _ClassVar[int]
    T2_NS_FIELD_NUMBER: _ClassVar[int]
    T3_NS_FIELD_NUMBER: _ClassVar[int]
    t1_ns: int
    t2_ns: int
    t3_ns: int
    def __init__(self, t1_ns: _Optional[int] = ..., t2_ns: _Optional[int] = ..., t3_ns: _Optional[int] = ...) -> None: ...

class ClockOffset(_message.Message):
    __slots__ = ("offset_ns", "rtt_ns")
    OFFSET_NS_FIELD_NUMBER: _ClassVar[int]
    RTT_NS_FIELD_NUMBER: _ClassVar[int]
    offset_ns: int
    rtt_ns: int
    def __init__(self, offset_ns: _Optional[int] = ..., rtt_ns: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("step", "phase", "module", "step_ns", "position_ns", "median_step_ns", "stack", "backward_passes", "repeat_ms", "running")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    POSITION_NS_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_STEP_NS_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    REPEAT_MS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    step: int
    phase: str
    module: str
    step_ns: int
    position_ns: int
    median_step_ns: int
    stack: _containers.RepeatedScalarFieldContainer[str]
    backward_passes: int
    repeat_ms: int
    running: bool
    def __init__(self, step: _Optional[int] = ..., phase: _Optional[str] = ..., module: _Optional[str] = ..., step_ns: _Optional[int] = ..., position_ns: _Optional[int] = ..., median_step_ns: _Optional[int] = ..., stack: _Optional[_Iterable[str]] = ..., backward_passes: _Optional[int] = ..., repeat_ms: _Optional[int] = ..., running: _Optional[bool] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "report", "ping", "clock", "heartbeat", "reports")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    report: StepReport
    ping: ClockPing
    clock: ClockOffset
    heartbeat: Heartbeat
    reports: StepReportBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ..., ping: _Optional[_Union[ClockPing, _Mapping]] = ..., clock: _Optional[_Union[ClockOffset, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., reports: _Optional[_Union[StepReportBatch, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class CaptureTrace(_message.Message):
    __slots__ = ("capture_id", "steps")
    CAPTURE_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    capture_id: str
    steps: int
    def __init__(self, capture_id: _Optional[str] = ..., steps: _Optional[int] = ...) -> None: ...

class Pause(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Resume(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetSampling(_message.Message):
    __slots__ = ("every_n_steps",)
    EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    every_n_steps: int
    def __init__(self, every_n_steps: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("capture", "pause", "resume", "sampling")
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    capture: CaptureTrace
    pause: Pause
    resume: Resume
    sampling: SetSampling
    def __init__(self, capture: _Optional[_Union[CaptureTrace, _Mapping]] = ..., pause: _Optional[_Union[Pause, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., sampling: _Optional[_Union[SetSampling, _Mapping]] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("ack", "pong", "control")
    ACK_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    pong: ClockPong
    control: Control
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., pong: _Optional[_Union[ClockPong, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ...) -> None: ...
