#!/usr/bin/env bash
# Everything modtrack proves on a CUDA machine, in one unattended run (< 8 minutes), printing every figure:
#   - the CUDA tests (pytest -m cuda: event timing truth with torch.cuda._sleep in forward and backward, the
#     sender resolving events, sampled mode on the GPU, NCCL's completion hook timing a real all-reduce and the
#     kernel end the collector places an NCCL wait at, against each call's window of a module called twice
#     (tests/test_collectives_cuda.py: one GPU, so no skew), NVML's sample of the GPU torch uses and of a busy
#     GPU (tests/test_gpu_health_cuda.py, skipped without nvidia-ml-py), and whatever else is marked cuda);
#   - what recording one event costs (torch's Event.record() vs the clock's recorder);
#   - agent overhead on the GPU: MLP-200 (per module call, against the seed's ModuleTracker) and GPT-2 small
#     (transformers' GPT2Config, % of a ~100 ms step), full detail, with the sender resolving the events, and
#     sampled mode.
# Run from the repository root on a machine with torch (CUDA) installed:  bash tests/bench/gpu_check.sh
# Output: stdout, and every piece under ${OUT:-/tmp/modtrack-gpu-check}/.
set -u
cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-/tmp/modtrack-gpu-check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS=1

section() { printf '\n==== %s (%s, %ss in)\n' "$1" "$(date -u +%H:%M:%S)" "$SECONDS"; }
# seconds for the next step: at most CAP, and never into the RESERVE the steps after it need (470 s in all)
budget() { local left=$((470 - SECONDS - $2)); [ "$left" -gt "$1" ] && left=$1; [ "$left" -lt 10 ] && left=10; echo "$left"; }

section "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -5
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

section "install (no dependencies)"
if ! "$PY" -c 'import modtrack.agent' 2>/dev/null; then
  timeout "$(budget 60 400)" "$PY" -m pip install -q -e . --no-deps --no-build-isolation >"$OUT_DIR/pip.log" 2>&1
fi
if ! "$PY" -c 'import modtrack.agent' 2>/dev/null; then  # no pip, no setuptools: the folders as a namespace package
  SHIM="$OUT_DIR/shim"
  mkdir -p "$SHIM/modtrack"
  for part in agent collector protos; do ln -sfn "$PWD/$part" "$SHIM/modtrack/$part"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import modtrack.agent; print("modtrack.agent from", modtrack.agent.__file__)'
for dep in grpc numpy transformers pytest google.protobuf pynvml; do
  "$PY" -c "import $dep" 2>/dev/null && echo "have $dep" || echo "MISSING $dep (what needs it is skipped)"
done

section "CUDA tests"
if "$PY" -c 'import pytest' 2>/dev/null; then
  CUDA_FILES=$(grep -l "mark.cuda" tests/test_*.py)
  echo "files with CUDA tests: $CUDA_FILES"
  # shellcheck disable=SC2086
  timeout "$(budget 120 290)" "$PY" -m pytest -o addopts="" -p no:cacheprovider -q -rs -m cuda $CUDA_FILES \
    >"$OUT_DIR/cuda_tests.txt" 2>&1
  if grep -q "ImportError while loading conftest" "$OUT_DIR/cuda_tests.txt"; then  # the collector's deps missing
    echo "(conftest needs packages this machine lacks: again without it)"
    # shellcheck disable=SC2086
    timeout "$(budget 100 290)" "$PY" -m pytest -o addopts="" -p no:cacheprovider --noconftest -q -rs -m cuda $CUDA_FILES \
      >"$OUT_DIR/cuda_tests.txt" 2>&1
  fi
  tail -30 "$OUT_DIR/cuda_tests.txt"
else
  echo "pytest missing: CUDA tests not run"
fi

section "one event recorded: torch.cuda.Event.record() vs the clock's recorder (us per record)"
timeout "$(budget 40 260)" "$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/record_cost.txt"
import time, torch
from modtrack.agent.clocks import CudaEventClock, current_stream_recorder
torch.cuda.init()
events = [torch.cuda.Event(enable_timing=True) for _ in range(1000)]
fast = current_stream_recorder()
def best(fn, rounds=5, n=20):
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n):
            for ev in events:
                fn(ev)
        out.append((time.perf_counter() - t) / (n * len(events)) * 1e6)
    return min(out)
print(f"Event.record(): {best(lambda ev: ev.record()):.2f} us; clock recorder: {best(fast):.2f} us")
clock = CudaEventClock()
torch.cuda.synchronize(); t = time.perf_counter()
for step in range(200):
    for _ in range(800):
        clock.stamp()
    batch = clock.close_step(); batch.wait(); batch.resolve()
print(f"clock.stamp() incl. pooling: {(time.perf_counter() - t) / (200 * 800) * 1e6:.2f} us per stamp "
      f"(resolution included, 800 stamps/step); events made: {clock.created}")
EOF

SENDER=",sender"  # the sender thread resolving events needs grpc (the transport)
"$PY" -c 'import grpc' 2>/dev/null || SENDER=""

section "agent overhead on the GPU: MLP-200 (wall time per step, per module call vs the seed)"
timeout "$(budget 110 150)" "$PY" tests/bench/agent_overhead.py --device cuda --models mlp200 --rounds 2 --steps 60 \
  --modes "plain,seed,hooks$SENDER,sampled" --sample-every 10 2>"$OUT_DIR/mlp200.err" | tee "$OUT_DIR/mlp200.txt"
tail -3 "$OUT_DIR/mlp200.err"

section "agent overhead on the GPU: GPT-2 small, batch 8 x 512 (% of the step)"
timeout "$(budget 170 0)" "$PY" tests/bench/agent_overhead.py --device cuda --models gpt2small --rounds 2 --steps 20 \
  --modes "plain,hooks$SENDER,sampled" --sample-every 10 2>"$OUT_DIR/gpt2small.err" | tee "$OUT_DIR/gpt2small.txt"
tail -3 "$OUT_DIR/gpt2small.err"

section "done"
echo "targets (issue 15 item 1): MLP-200 hooks/seed and sender/seed <= 0.5; GPT-2 small sender overhead <= 1 % of the"
echo "step; sampled <= 0.1 %; CUDA tests passed (timing truth +-20 %). Figures above; files in $OUT_DIR"
