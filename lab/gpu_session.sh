#!/usr/bin/env bash
# One machine lease's measurements as ONE detached job (a lease gives 30 min of device time, the start included):
# the GPU tests, the video decoder's conv layouts (NDHWC vs NCDHW, same run), then the end-to-end bench, FP8 with
# the FP8 text encoder first (the fastest variant: its numbers matter most), bf16 after it if time is left.
#
#   bash lab/gpu_job.sh start s -- bash lab/gpu_session.sh /tmp/r 1500
#   bash lab/gpu_job.sh wait s 540 /tmp/r      # back to back until it ends
#
# $1: results folder (default /tmp/r); $2: seconds this job may run (default 1500): the bench gets a deadline so
# that it starts no precision or second preset it cannot finish; $3: the steps (default tests,vae,bench; aotitests:
# the engine wrapper's and parallel compiles' GPU tests first; fa3tests: the fa3 ops' GPU tests after the bench);
# $PRECISIONS: the bench's variants (default fp8+ft8,bf16: the first calibrates on eager pipeline runs). The decoder's layout for the bench is the probe's
# verdict: NDHWC (the CUDA default) unless its engine failed to build or run, then NCDHW.
# The official pipeline runs in the bench's process after the first precision (same-run ratios) when ltx-core, ltx-pipelines and PyAV
# import (carry their wheels, docs/benchmarks.md); else the bench runs with --no-official and says so.
# A `+sage` precision needs SageAttention 2 built on the machine: $SAGE_SRC (its source, unpacked) is built by
# lab/sage_build.py in the background while the tests and the decoder probe run, into /tmp/sage; a `+fa3`
# precision FlashAttention-3 ($FA3_SRC, $CUTLASS_SRC: see lab/gpu_lease_sage.sh) by lab/fa3_build.py, into /tmp/fa3.
#
#   PRECISIONS=fp8+ft8,fp8+ft8+sage SAGE_SRC=/tmp/sage-src bash lab/gpu_job.sh start s -- bash lab/gpu_session.sh
set -uo pipefail

R=${1:-/tmp/r}
BUDGET=${2:-1500}
STEPS=${3:-tests,vae,bench}
PRECISIONS=${PRECISIONS:-fp8+ft8,bf16}
mkdir -p "$R"
export FVRT_CXX=${FVRT_CXX:-g++-12}
step() { echo "=== [$SECONDS s] $*"; }

sage_pid=
if [[ ",$PRECISIONS," == *+sage* ]]; then
  step "SageAttention 2: building its Hopper kernels in the background ($R/sage-build.log)"
  (python3 lab/sage_build.py --src "${SAGE_SRC:?a +sage precision needs SAGE_SRC}" --target /tmp/sage \
    --jobs "$(nproc)" >"$R/sage-build.log" 2>&1
    echo "rc=$?" >>"$R/sage-build.log") &
  sage_pid=$!
  export PYTHONPATH="${PYTHONPATH:-}:/tmp/sage"
fi
fa3_pid=
if [[ ",$PRECISIONS," == *+fa3* && -d /tmp/fa3/flash_attn_3 ]]; then
  step "FlashAttention-3: built already in /tmp/fa3 (an earlier job on this machine)"
  export PYTHONPATH="${PYTHONPATH:-}:/tmp/fa3"
elif [[ ",$PRECISIONS," == *+fa3* ]]; then
  step "FlashAttention-3: building its head-dim-128 forward in the background ($R/fa3-build.log)"
  (python3 lab/fa3_build.py --src "${FA3_SRC:?a +fa3 precision needs FA3_SRC}" \
    --cutlass "${CUTLASS_SRC:?a +fa3 precision needs CUTLASS_SRC}" --target /tmp/fa3 --jobs "$(nproc)" \
    >"$R/fa3-build.log" 2>&1
    echo "rc=$?" >>"$R/fa3-build.log") &
  fa3_pid=$!
  export PYTHONPATH="${PYTHONPATH:-}:/tmp/fa3"
fi

layout=auto
# the AOTInductor wrapper without its per-input check functions, and parallel compiles (--jobs), on CUDA: when
# either fails, the bench compiles in one process (BENCH_OPTS loses its --build-jobs)
if [[ ",$STEPS," == *,aotitests,* ]]; then
  step "GPU tests: the engine wrapper and parallel compiles"
  python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_compile_jobs.py \
    "tests/test_aoti.py::test_engine_wrapper_has_no_input_check_functions_and_runs_unchanged" >"$R/aoti-tests.log" 2>&1
  rc=$?
  tail -n 25 "$R/aoti-tests.log"
  if ((rc != 0)) && [[ -n "${BENCH_OPTS+set}" ]]; then
    BENCH_OPTS=$(sed -E 's/--build-jobs [0-9]+//' <<<"${BENCH_OPTS-}")
    echo "the GPU tests failed: the bench compiles in one process (BENCH_OPTS=$BENCH_OPTS)"
  fi
fi
if [[ ",$STEPS," == *,tests,* ]]; then
  step "GPU tests"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_pipeline.py tests/test_fp8_attention.py \
    "tests/test_sage_attention.py::test_sage_engines_lower_their_small_attentions_to_cudnn" 2>&1 |
    tail -n 15 | tee "$R/gpu-tests.log"
fi
if [[ ",$STEPS," == *,vae,* ]]; then
  step "video decoder conv layouts"
  python3 lab/gpu_vae_probe.py --out "$R/vae" --engines /dev/shm/vae --engine-only --layouts ndhwc,ncdhw --reps 2
  rm -rf /dev/shm/vae
  if ! python3 -c "import json, sys; r = json.load(open('$R/vae/vae.json'))['runs']; sys.exit('median_s' not in r.get('engine ndhwc', {}))"; then
    layout=ncdhw
  fi
fi
[[ ",$STEPS," == *,bench,* ]] || exit 0

# a build the first precision needs is waited for here; one only a later precision needs goes on beside the first
# precision's weights, calibration and engine builds (10+ min; the build takes about 2), and is waited for after
# the bench only to report it. Its target folder exists from the start: Python's path finder skips a sys.path entry
# that was missing when first searched, and finds files that appear later in one that existed.
first=${PRECISIONS%%,*}
for build in sage fa3; do
  pid_var="${build}_pid"
  mkdir -p "/tmp/$build"
  if [[ -n "${!pid_var}" && "+$first" == *"+$build"* ]]; then
    step "$build: waiting for its build"
    wait "${!pid_var}"
    tail -n 2 "$R/$build-build.log"
    printf -v "$pid_var" ''  # waited for: the loop after the bench skips it
  fi
done
official=--official
python3 -c "import ltx_core, ltx_pipelines, av" 2>/dev/null || {
  official=--no-official
  echo "ltx-core / ltx-pipelines / PyAV not importable: the bench runs without the official pipeline"
}
# the fp8+ft8 build and its two presets take ~15 min on the H100; bf16 after it reuses all but its DiT block and
# needs ~4 min for both presets: start it only when that much is left
left=$((BUDGET - SECONDS))
deadline=$((left - ${DEADLINE_MARGIN_S:-240}))
step "bench, conv layout $layout, deadline ${deadline} s"
# shorter leases: BENCH_OPTS="" drops the kernel trace and the prefetched-text row (about 1 min per precision)
# shellcheck disable=SC2086  # BENCH_OPTS is a list of flags
python3 scripts/bench.py --random full --device cuda --profile 1080p --precisions "$PRECISIONS" \
  --presets distilled,realtime --repeats 1 --repeats-dit 3 --calib-method hooks --memory offload --drop-reference \
  ${BENCH_OPTS---trace --prefetch-text} "$official" --conv-layout "$layout" --engines /dev/shm/eng --out "$R/bench" \
  --deadline-s "$deadline"
for build in sage fa3; do
  pid_var="${build}_pid"
  [[ -n "${!pid_var}" ]] && wait "${!pid_var}" && tail -n 2 "$R/$build-build.log"
done
# the fa3 ops' GPU tests (error bounds, CUDA-graph capture), when FlashAttention-3 was built and a minute is left
if [[ ",$STEPS," == *,fa3tests,* && -d /tmp/fa3/flash_attn_3 ]] && ((BUDGET - SECONDS > 60)); then
  step "GPU tests: the fa3fp8 and fa3 ops"
  python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_fa3_attention.py 2>&1 | tail -n 15 |
    tee "$R/fa3-tests.log"
fi
step "done"
