#!/usr/bin/env bash
# One prepared GPU run: install, GPU kernel tests, every benchmark at full GPU sizes, results to $OUT.
#
#   bash bench/gpu_suite.sh            # from the repository root, on a CUDA machine
#
# Assumes torch + triton are preinstalled (no network). Total wall time is kept near 8 minutes by
# a timeout per step (override with the *_S variables below); each benchmark appends its CSV rows
# case by case, so a step that runs out of time still leaves the rows it finished.
# Results: bench/results/<name>.csv (+ <name>_cuda.png), README.md (regenerated) and gpu_suite.log; copied
# to "$OUT" when that variable is set.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RES=bench/results
LOG=$RES/gpu_suite.log
mkdir -p "$RES"
: > "$LOG"
BUDGET_S=${BUDGET_S:-540}   # the whole suite; each step gets min(its timeout, what is left)
TESTS_S=${TESTS_S:-90}
ATTN_S=${ATTN_S:-110}
LOGPROB_S=${LOGPROB_S:-75}
KL_S=${KL_S:-50}
GAE_S=${GAE_S:-35}
STEPS_S=${STEPS_S:-80}
T0=$(date +%s)

log() { echo "[gpu_suite +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

copy_out() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp -f "$RES"/*.csv "$OUT"/ 2>/dev/null
    cp -f "$RES"/*.png "$OUT"/ 2>/dev/null
    cp -f "$LOG" "$RES"/README.md "$OUT"/ 2>/dev/null
  fi
  return 0
}
trap copy_out EXIT

step() {  # step <timeout_s> <label> <command...>
  local t=$1 label=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - T0) - 5 ))
  if [ "$left" -lt "$t" ]; then t=$left; fi
  if [ "$t" -le 5 ]; then log "skip $label: suite budget of ${BUDGET_S}s spent"; return 0; fi
  log "start $label (timeout ${t}s): $*"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "end $label rc=$rc"
  copy_out
  return 0
}

log "host $(hostname) python $($PY -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "device", torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"

step 60 install $PY -m pip install --no-deps --no-build-isolation -e .
# Build the C++ / CUDA ops once up front (cached), so no benchmark pays the compile inside its budget.
step 150 build-ops $PY -c 'import torch; from kernels import _cpp; print(_cpp.build_info()); r = torch.zeros(2, 4, device="cuda"); print(_cpp.gae_cuda(r, r, r + 1, gamma=1.0, lam=0.95)[0].shape)'
step "$TESTS_S" gpu-tests $PY -m pytest -m gpu -x -q
step "$GAE_S" bench-gae $PY -m bench gae --device cuda --plot
step "$ATTN_S" bench-attention $PY -m bench attention --device cuda --plot
step "$LOGPROB_S" bench-logprob $PY -m bench logprob --device cuda --plot
step "$KL_S" bench-kl $PY -m bench kl --device cuda --plot
step "$STEPS_S" bench-steps $PY -m bench steps --device cuda
BUDGET_S=$(( BUDGET_S + 30 )) step 20 report $PY -m bench.report
log "done"
