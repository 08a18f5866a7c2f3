#!/usr/bin/env bash
# The prepared GPU runs, two commands of at most 4 minutes each on one H200:
#
#   bash bench/gpu_suite.sh check [--dry-run]   # environment, matmul / copy ceilings, every Triton
#                                               # and CUDA test (interpreter off), one timing per
#                                               # kernel vs its baseline (bench/gpu_check.py)
#   bash bench/gpu_suite.sh bench [--dry-run]   # every benchmark at GPU sizes
#
# --dry-run prints the steps, their commands and time caps (and their sum) and runs nothing.
# Assumes torch + triton are installed (no network, no pip): the repository is put on PYTHONPATH.
# Each step runs under `timeout` with its cap, cut further to what is left of BUDGET_S (240 s), so a
# command never runs past 4 minutes in all; benchmarks append their CSV rows case by case, so a
# step that runs out of time still leaves the rows it finished. No step compiles a torch.compile
# provider cold (those cost minutes on a fresh machine): the sweeps run with explicit --providers.
# Output: with $OUT set, everything goes to $OUT (at most 8 files: gpu_suite_<cmd>.log and the
# CSVs, plus gpu_tests.xml for check and README.md for bench); without, to bench/results/.
# Overrides: PYTHON (default python3), BUDGET_S, GPU_CHUNK_BYTES (chunked providers' buffer).
set -u
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
MODE="" DRY=0
for a in "$@"; do
  case "$a" in
    check|bench) MODE=$a ;;
    --dry-run|-n) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$a'" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -z "$MODE" ]; then usage >&2; exit 2; fi

PY=${PYTHON:-python3}
RES=${OUT:-bench/results}
LOG=$RES/gpu_suite_$MODE.log
BUDGET_S=${BUDGET_S:-240}
# The chunked PyTorch providers keep one fp32 [rows, V] buffer of kernels.logprob.CHUNK_BYTES; its
# 16 MiB default is sized for CPU caches (83 rows at V = 50257: hundreds of tiny GEMMs on a GPU);
# `bench.gpu_check bench` sets it from GPU_CHUNK_BYTES before the benchmark runs.
GPU_CHUNK_BYTES=${GPU_CHUNK_BYTES:-1073741824}
export TRITON_INTERPRET=0                     # real compilation: tests/conftest.py keeps an explicit 0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 GPU_CHUNK_BYTES

STEPS=()   # "cap|label|command" (the command is eval'ed: quoted arguments stay whole)
add() { STEPS+=("$1|$2|$3"); }
q() { printf '%q' "$1"; }

# the tests of the Triton kernels and the CUDA op (they run on the GPU when there is one)
TESTS="tests/test_attention.py tests/test_logprob.py tests/test_kl.py tests/test_gae.py tests/test_kernels_model.py"
PYTEST="$PY -m pytest -q -p no:cacheprovider --durations=8"
if [ "$MODE" = check ]; then
  add 10 env "$PY -m bench.gpu_check env"
  add 20 ceilings "$PY -m bench ceilings --device cuda --results-dir $(q "$RES")"
  # the real-size tests first (they build the CUDA op that kernel-timings uses), then the others
  add 60 gpu-tests "$PYTEST -m gpu --junitxml=$(q "$RES/gpu_tests.xml") $TESTS tests/test_cpp_ops.py"
  add 75 kernel-tests "$PYTEST -m 'not gpu' $TESTS"
  add 65 kernel-timings "$PY -m bench.gpu_check kernels --results-dir $(q "$RES")"
else
  add 10 env "$PY -m bench.gpu_check env"
  add 20 gae "$PY -m bench gae --device cuda --results-dir $(q "$RES")"
  add 55 attention "$PY -m bench attention --device cuda --results-dir $(q "$RES") --providers ours,ours_auto,flex,sdpa_flash,sdpa_cudnn,sdpa_efficient,flash_attn,eager"
  add 40 logprob "$PY -m bench.gpu_check bench logprob --device cuda --results-dir $(q "$RES") --providers ours,chunked,eager,liger"
  add 30 kl "$PY -m bench.gpu_check bench kl --device cuda --results-dir $(q "$RES") --providers ours,chunked,eager"
  add 55 steps "$PY -m bench steps --device cuda --results-dir $(q "$RES")"
  add 10 report "$PY -m bench.report --results-dir $(q "$RES")"
fi

TOTAL=0
for s in "${STEPS[@]}"; do TOTAL=$(( TOTAL + ${s%%|*} )); done

if [ "$DRY" = 1 ]; then
  echo "gpu_suite.sh $MODE --dry-run: ${#STEPS[@]} steps, caps sum to ${TOTAL} s (budget ${BUDGET_S} s); results -> $RES"
  for s in "${STEPS[@]}"; do
    cap=${s%%|*}; rest=${s#*|}; label=${rest%%|*}; cmd=${rest#*|}
    printf '  [%3d s] %s: %s\n' "$cap" "$label" "$cmd"
  done
  echo "total cap: ${TOTAL} s"
  echo "environment: TRITON_INTERPRET=$TRITON_INTERPRET GPU_CHUNK_BYTES=$GPU_CHUNK_BYTES PYTHONPATH=$PYTHONPATH"
  [ "$MODE" = bench ] && echo "not in bench: ceilings (in check), ppo_vs_trl and ppo_profile (CPU benchmarks)"
  if [ "$TOTAL" -gt "$BUDGET_S" ]; then echo "caps exceed the budget" >&2; exit 1; fi
  exit 0
fi

mkdir -p "$RES"
: > "$LOG"
T0=$(date +%s)
log() { echo "[gpu_suite $MODE +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
FAILED=0
for s in "${STEPS[@]}"; do
  cap=${s%%|*}; rest=${s#*|}; label=${rest%%|*}; cmd=${rest#*|}
  left=$(( BUDGET_S - ($(date +%s) - T0) - 3 ))
  t=$cap; if [ "$left" -lt "$t" ]; then t=$left; fi
  if [ "$t" -le 3 ]; then log "skip $label: budget of ${BUDGET_S} s spent"; FAILED=1; continue; fi
  log "start $label (cap ${t} s)"
  eval "timeout -k 2 $t $cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && FAILED=1
  log "end $label rc=$rc$( [ "$rc" -eq 124 ] && echo ' (cap reached)')"
done
log "done in $(( $(date +%s) - T0 )) s; results in $RES"
exit $FAILED
